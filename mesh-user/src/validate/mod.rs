//! Checks that parsed resources make sense, alone and together, before anything is compiled.
//!
//! This module owns the rules of the form "this field must ..." (per resource, [`resource`]) and
//! "this reference must resolve / these must not conflict" (across resources, [`cross`]). It
//! reports every problem it finds, each with its file, document, resource and field path, so a
//! user fixes a rule set in one round. It does not decide what needs the L7 proxy: that is
//! `compile`'s call, because it depends on which service a route ends up serving.

mod cross;
pub(crate) mod index;
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

/// Every problem found; `Display` prints one per line.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.lines())]
pub struct ValidationErrors {
    /// The problems, in resource order.
    pub errors: Vec<ValidationError>,
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

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok(())` when empty, else `Err(self)`.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

/// Validates every resource and the references between them; returns all problems found.
pub fn validate(set: &ResourceSet) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::default();
    for resource in &set.resources {
        resource::check(resource, &mut errors);
    }
    cross::check(set, &mut errors);
    errors.into_result()
}

#[cfg(test)]
mod tests;
