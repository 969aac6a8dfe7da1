//! One module per attacked boundary (issue 11's items).
pub mod disk;
