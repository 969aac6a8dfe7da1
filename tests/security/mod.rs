//! One module per attacked boundary (issue 11's items).

use serde_json::Value;

/// A create body with this run's isolation (as `Daemon::create` adds it).
pub fn with_iso(mut body: Value) -> Value {
    if let Some(o) = body.as_object_mut() {
        o.entry("isolation")
            .or_insert_with(|| Value::from(sandforge_tests::isolation()));
    }
    body
}

pub mod agent_socket;
pub mod connections;
pub mod disk;
pub mod dns;
pub mod memory;
pub mod mounts;
pub mod proxy;
pub mod quota;
pub mod races;
pub mod seccomp;
pub mod state_files;
