//! Checks that parsed resources make sense, alone and together, before anything is compiled.
//!
//! This module owns the rules of the form "this field must ..." (per resource, [`resource`]) and
//! "this reference must resolve / these must not conflict" (across resources, [`cross`]). It
//! reports every problem it finds, each with its file, document, resource and field path, so a
//! user fixes a rule set in one round.
//!
//! Two severities, as in Istio: an *error* is input that cannot mean anything (a negative
//! weight, a bad regex, a port out of range) and rejects the whole submission; a *warning* is
//! input Istio accepts and serves as it can (IST0101-like: a route to a host, subset or gateway
//! not defined yet, a subset that selects no endpoint yet). Warnings carry the same position as
//! errors and never block an apply: the rule takes effect by itself once the missing piece
//! arrives, and until then traffic routed to nothing is refused (503 on the L7 proxy, refused
//! connection on the kernel path).

mod cross;
mod resource;
pub(crate) mod values;

use std::fmt;

use crate::config::{Resource, ResourceSet, Source};

/// One problem found in the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// Where the resource was read from.
    pub source: Source,
    /// The resource, e.g. "VirtualService default/reviews".
    pub resource: String,
    /// Field path, e.g. "spec.tcp[0].route[1].weight".
    pub field: String,
    /// What was expected.
    pub message: String,
}

impl ValidationError {
    /// An error about `field` of `resource`.
    pub fn new(resource: &Resource, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            source: resource.source.clone(),
            resource: resource.display_name(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} ({}): {}: {}",
            self.source.file, self.source.document, self.resource, self.field, self.message
        )
    }
}

/// Something Istio accepts but that will not (yet) do what it says: printed with the same
/// position as an error, prefixed `warning: `.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning(pub ValidationError);

impl Warning {
    /// A warning about `field` of `resource`.
    pub fn new(resource: &Resource, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(ValidationError::new(resource, field, message))
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "warning: {}", self.0)
    }
}

/// Every problem found; `Display` prints one error per line (warnings are kept aside in
/// `warnings`, for the caller to print next to the errors).
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.lines())]
pub struct ValidationErrors {
    /// The problems, in resource order.
    pub errors: Vec<ValidationError>,
    /// What Istio would accept with a warning (never a reason to reject).
    pub warnings: Vec<Warning>,
}

impl ValidationErrors {
    fn lines(&self) -> String {
        self.errors
            .iter()
            .map(ValidationError::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Adds an error about `field` of `resource`.
    pub fn push(
        &mut self,
        resource: &Resource,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors
            .push(ValidationError::new(resource, field, message));
    }

    /// Adds a warning about `field` of `resource`.
    pub fn warn(
        &mut self,
        resource: &Resource,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.warnings.push(Warning::new(resource, field, message));
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The warnings when there is no error, else `Err(self)`.
    pub fn into_result(self) -> Result<Vec<Warning>, ValidationErrors> {
        if self.errors.is_empty() {
            Ok(self.warnings)
        } else {
            Err(self)
        }
    }
}

/// Validates every resource and the references between them; returns all problems found, or
/// the warnings when nothing is an error.
pub fn validate(set: &ResourceSet) -> Result<Vec<Warning>, ValidationErrors> {
    let mut errors = ValidationErrors::default();
    for resource in &set.resources {
        resource::check(resource, &mut errors);
    }
    cross::check(set, &mut errors);
    errors.into_result()
}

#[cfg(test)]
mod tests;
