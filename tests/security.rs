//! The security suite: each module attacks one boundary the way a hostile
//! sandbox or client would (the adversarial review of issue 11) and reports
//! `security: <attack>: N attempts, N refused`. Runs against both backends
//! like the rest of the API suite (`SANDFORGE_TEST_ISOLATION`).
//!
//! Run with `--nocapture` to see the tallies; a single attempt that is not
//! refused fails the test.

#[path = "security/mod.rs"]
mod attacks;
