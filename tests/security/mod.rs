//! One module per attacked boundary (issue 11's items).
pub mod connections;
pub mod dns;
pub mod memory;
