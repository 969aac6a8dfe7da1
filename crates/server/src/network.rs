//! The controller's side of sandbox networking: which mode and egress
//! policy a create gets, the /30 slot a networked sandbox holds (recorded
//! in its stored spec, so a restart finds the same addresses), attaching
//! and detaching it around the backend's start and destroy, and `PATCH`ing
//! the policy of a running sandbox, and refusing (400
//! `network_unavailable`, naming the field) a create or `PATCH` that asks
//! for a network when the daemon runs without one. The host side (links, nftables, DNS)
//! is `sandforge_runtime::network`; this module must not touch it directly.

use http::StatusCode;
use sandforge_api::network::chosen_egress;
use sandforge_api::sandbox::ValidCreate;
use sandforge_api::{Egress, Network, PatchSandbox, Sandbox, SandboxStatus};
use sandforge_runtime::network::Lease;

use crate::controller::Controller;
use crate::db::{Admission, Refused, SandboxRow};
use crate::error::ApiError;

impl Controller {
    /// The network mode and policy of a new sandbox. `egress_field` is the
    /// spelling the request used for the policy (`egress` or
    /// `network_policy`). A policy without a `network` implies `nat`.
    /// Without host networking, asking for `nat` or a policy is a 400
    /// naming the field, never an offline sandbox.
    pub(crate) fn net_choice(
        &self,
        v: &ValidCreate,
        egress_field: &str,
    ) -> Result<(Network, Option<Egress>), ApiError> {
        if self.network.is_none() {
            if v.network == Some(Network::Nat) {
                return Err(ApiError::network_unavailable("network"));
            }
            if v.egress.is_some() {
                return Err(ApiError::network_unavailable(egress_field));
            }
        }
        let mode = match (v.network, &v.egress) {
            (Some(m), _) => m,
            (None, Some(_)) => Network::Nat,
            (None, None) => self.default_network(),
        };
        match mode {
            Network::Offline => Ok((mode, None)),
            Network::Nat if self.network.is_none() => Err(ApiError::network_unavailable("network")),
            Network::Nat => Ok((mode, Some(v.egress.clone().unwrap_or_default()))),
        }
    }

    fn default_network(&self) -> Network {
        if self.cfg.default_network == "nat" && self.network.is_some() {
            Network::Nat
        } else {
            Network::Offline
        }
    }

    /// Insert a new sandbox through the database's admission (the org's
    /// quota, a free name, the lowest free network slot for a NAT one),
    /// all in one transaction.
    pub(crate) fn admit(&self, row: &mut SandboxRow) -> Result<(), ApiError> {
        let slots = match (&self.network, row.spec.network) {
            (Some(net), Network::Nat) => Some(net.config().slots()),
            (None, Network::Nat) => return Err(ApiError::network_unavailable("network")),
            _ => None,
        };
        let adm = Admission {
            max_live: self.cfg.max_sandboxes_per_org,
            slots,
        };
        self.db.admit(row, adm).map_err(|e| match e {
            Refused::Quota { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                e.to_string(),
            ),
            Refused::NameInUse(_) => {
                ApiError::conflict("name_in_use", format!("name: {e}")).field("name")
            }
            Refused::NetworkFull => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "network_full",
                e.to_string(),
            ),
            Refused::Db(e) => e.into(),
        })
    }

    pub(crate) fn lease_of(&self, row: &SandboxRow) -> Option<Lease> {
        let net = self.network.as_ref()?;
        row.spec.net_slot.map(|s| net.config().lease(&row.id, s))
    }

    /// Rules and resolver before the backend builds the link.
    pub(crate) async fn net_attach(&self, row: &SandboxRow) -> Result<(), ApiError> {
        if let (Some(net), Some(lease)) = (&self.network, self.lease_of(row)) {
            let egress = row.spec.egress.clone().unwrap_or_default();
            net.attach(&row.id, &lease, &egress)
                .await
                .map_err(|e| net_error(format!("attaching the network: {e}")))?;
        }
        Ok(())
    }

    /// Everything of the sandbox's network, after its backend is gone.
    pub(crate) async fn net_detach(&self, row: &SandboxRow) -> Result<(), ApiError> {
        if let (Some(net), Some(lease)) = (&self.network, self.lease_of(row)) {
            net.detach(&row.id, &lease)
                .await
                .map_err(|e| net_error(format!("detaching the network (retry): {e}")))?;
        }
        Ok(())
    }

    /// `PATCH /v1/sandboxes/{id}`: `keep_hot`, and a new egress policy, in
    /// force at once.
    pub async fn patch(&self, org: &str, id: &str, req: PatchSandbox) -> Result<Sandbox, ApiError> {
        let field = egress_field(req.network_policy.is_some());
        let egress = chosen_egress(req.egress, req.network_policy)?;
        // Read, change and write the spec under the sandbox's op lock: a
        // concurrent keepalive, PATCH or lifecycle step cannot interleave
        // and lose one of the changes.
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let row = self.get(org, id)?;
        // Everything checked before anything changes.
        if row.status == SandboxStatus::Destroyed {
            return Err(crate::controller::not_running(&row));
        }
        if egress.is_some() {
            if row.spec.network != Network::Nat {
                return Err(ApiError::conflict(
                    "no_network",
                    format!("sandbox '{id}' is offline: it has no egress to filter"),
                )
                .field(field));
            }
            if self.network.is_none() {
                return Err(ApiError::network_unavailable(field));
            }
        }
        let mut spec = row.spec.clone();
        if let Some(k) = req.keep_hot {
            spec.lifecycle.keep_hot = k;
        }
        if let Some(egress) = egress {
            if let Some(net) = &self.network {
                net.update(id, &egress)
                    .await
                    .map_err(|e| net_error(format!("updating the egress policy: {e}")))?;
            }
            spec.egress = Some(egress);
        }
        if spec != row.spec {
            self.db.set_spec(id, &spec)?;
        }
        Ok(self.to_api(&self.get(org, id)?))
    }
}

/// The name a request gave its egress policy: seed 003's `network_policy`
/// when it used that spelling, else `egress`.
pub(crate) fn egress_field(network_policy: bool) -> &'static str {
    if network_policy {
        "network_policy"
    } else {
        "egress"
    }
}

fn net_error(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "network_failed", message)
}
