// The same BPF build as mesh-user's, so the golden-packet tests load exactly what meshd embeds.
include!("../mesh-user/build.rs");
