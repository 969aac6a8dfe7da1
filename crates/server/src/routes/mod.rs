//! The HTTP surface: maps routes to controller calls. Thin by design: it
//! parses, authenticates (via the [`crate::auth::Caller`] extractor) and
//! shapes responses; decisions live in the controller.
//!
//! Every route exists both under `/v1` (seeds 000/001) and at the root
//! (seed 002's `/sandboxes/...`).

mod exec;
mod files;
mod health;
mod ports;
mod sandboxes;
mod templates;
mod terminal;

use axum::routing::{any, get, post};
use axum::Router;

use crate::error::{method_not_allowed, not_found_route};
use crate::AppState;

fn api() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get_one)
                .patch(sandboxes::patch)
                .delete(sandboxes::destroy),
        )
        .route("/templates", get(templates::list).post(templates::create))
        .route("/templates/import", post(templates::import))
        .route(
            "/templates/{id}",
            get(templates::get_one).delete(templates::delete),
        )
        .route("/templates/{id}/logs", get(templates::logs))
        .route("/sandboxes/{id}/template", post(templates::save))
        .route("/sandboxes/{id}/console", get(sandboxes::console))
        .route("/sandboxes/{id}/wake", post(sandboxes::wake))
        .route("/sandboxes/{id}/keepalive", post(sandboxes::keepalive))
        .route("/sandboxes/{id}/stop", post(sandboxes::stop))
        .route("/sandboxes/{id}/start", post(sandboxes::start))
        .route("/sandboxes/{id}/events", get(sandboxes::events))
        .route(
            "/sandboxes/{id}/snapshots",
            get(sandboxes::snapshots).post(sandboxes::take_snapshot),
        )
        .route(
            "/sandboxes/{id}/snapshots/{sid}",
            axum::routing::delete(sandboxes::delete_snapshot),
        )
        .route(
            "/sandboxes/{id}/snapshots/{sid}/rollback",
            post(sandboxes::rollback),
        )
        .route("/sandboxes/{id}/ws", get(terminal::ws))
        .route("/sandboxes/{id}/sessions", get(terminal::sessions))
        .route("/sandboxes/{id}/ports", get(ports::ports))
        .route("/ports", get(ports::all_ports))
        .route("/sandboxes/{id}/proxy/{port}", any(ports::proxy))
        .route("/sandboxes/{id}/proxy/{port}/", any(ports::proxy))
        .route("/sandboxes/{id}/proxy/{port}/{*path}", any(ports::proxy))
        .route(
            "/sandboxes/{id}/publish",
            post(ports::publish).get(ports::list_published),
        )
        .route(
            "/sandboxes/{id}/publish/{port}",
            axum::routing::delete(ports::unpublish),
        )
        .route("/sandboxes/{id}/execute", post(exec::execute))
        .route("/sandboxes/{id}/exec", post(exec::exec))
        .route(
            "/sandboxes/{id}/files",
            get(files::get).head(files::head).put(files::put),
        )
}

/// The publish listener: every request is routed by its `Host` header.
pub fn publish_router(state: AppState) -> Router {
    Router::new().fallback(ports::published).with_state(state)
}

/// Seed 003's agent-platform routes (`/api/sandbox/...`) that exist so far.
fn seed003() -> Router<AppState> {
    Router::new()
        .route("/templates", get(templates::list).post(templates::create))
        .route("/templates/import", post(templates::import))
        .route(
            "/templates/{id}",
            get(templates::get_one).delete(templates::delete),
        )
        .route("/templates/{id}/build", post(templates::rebuild))
        .route("/templates/{id}/pull", post(templates::rebuild))
        .route("/templates/{id}/logs", get(templates::logs))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .nest("/api/sandbox", seed003())
        .nest("/v1", api())
        .merge(api())
        .fallback(not_found_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}
