//! Sandforge runtimes: everything that turns a validated sandbox spec into a
//! running, isolated sandbox with an agent answering inside it, and back.
//!
//! Owns: the [`Backend`] trait (one per isolation kind), the container backend
//! (runc: namespaces, cgroups, seccomp, capabilities), templates on disk and
//! the [`AgentClient`] that speaks the agent protocol over the sandbox's one
//! stream. It must not know about HTTP routes, auth, organizations or the
//! database: the server crate owns those and calls in here.

pub mod agent;
pub mod backend;
pub mod commit;
pub mod console;
pub mod container;
pub mod error;
pub mod hostpath;
pub mod image;
pub mod microvm;
pub mod network;
pub mod snapshot;
pub mod sock;
pub mod template;
pub mod terminal;
pub mod tool;
pub mod tunnel;

pub use agent::AgentClient;
pub use backend::{Backend, Liveness, ResolvedMount, SandboxSpec, StopReport};
pub use error::RuntimeError;
pub use template::{Template, TemplateStore};
