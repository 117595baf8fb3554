//! TODO: filled in by the issue that owns it.
