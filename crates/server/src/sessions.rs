//! The controller's side of terminal sessions: the command a terminal runs
//! when the caller names none (the template's login shell), and the `init`
//! session a create asks for (seed 002). The sessions themselves live in
//! the guest agent; this module must not keep state about them.

use sandforge_agent_proto::{Resize, SessionRequest};
use sandforge_runtime::AgentClient;

use crate::controller::Controller;
use crate::db::SandboxRow;

/// The id of the session a create's `init` runs as.
pub const INIT_SESSION: &str = "init";

impl Controller {
    /// `[shell, "-l"]` of the sandbox's template, else `/bin/sh`.
    pub fn login_shell(&self, row: &SandboxRow) -> Vec<String> {
        match self.template_shell(&row.spec.template) {
            Some(sh) if !sh.is_empty() => vec![sh, "-l".into()],
            _ => vec!["/bin/sh".into()],
        }
    }

    /// Start `cmd` as the session `init` (a terminal of 24x80).
    pub(crate) async fn start_init(
        &self,
        agent: &AgentClient,
        row: &SandboxRow,
        cmd: &str,
    ) -> Result<(), sandforge_runtime::RuntimeError> {
        let req = SessionRequest {
            id: Some(INIT_SESSION.into()),
            argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            env: row.spec.env.clone(),
            cwd: None,
            size: Resize { rows: 24, cols: 80 },
            user: self.template_user(&row.spec.template),
        };
        agent.create_session(&req).await.map(|_| ())
    }
}
