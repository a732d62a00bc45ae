//! Per-tenant delivery status: each pod accounts, per source ID and window, for what it
//! received, delivered and failed ([`StatusBook`]); every window it produces one
//! [`StatusRecord`] per tenant with traffic to the status topic ([`publish`]); the
//! `status` command and the delivery page read the topic back and add the pods' and
//! windows' records up ([`merge`], [`read`], [`page`]).

pub mod book;
pub mod merge;
pub mod page;
pub mod partition;
pub mod publish;
pub mod read;
pub mod record;
pub mod report;
pub mod state;
pub mod time;

use std::sync::OnceLock;

pub use book::{Failure, Place, PodView, StatusBook};
pub use record::StatusRecord;
pub use state::State;

/// The process's book, which the pipeline's hooks write to.
pub fn book() -> &'static StatusBook {
    static BOOK: OnceLock<StatusBook> = OnceLock::new();
    BOOK.get_or_init(StatusBook::default)
}

/// This pod's per-tenant routes for the worker's HTTP port: `GET /tenants/{sourceId}`,
/// the tenant's view on this pod as JSON (404 when this pod has not seen it within the
/// last hour).
pub fn pod_routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    axum::Router::new().route(
        "/tenants/{source_id}",
        axum::routing::get(|Path(source): Path<String>| async move {
            match book().view(&source) {
                Some(view) => axum::Json(view).into_response(),
                None => (
                    StatusCode::NOT_FOUND,
                    axum::Json(serde_json::json!({
                        "error": "this pod has no traffic of this source ID within the last hour"
                    })),
                )
                    .into_response(),
            }
        }),
    )
}
