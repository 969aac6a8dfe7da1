//! The security suite's tally of hostile attempts (see tests/security.rs).

/// A tally of hostile attempts for the security suite: every attempt is
/// recorded with whether the system refused it; [`Attempts::finish`] prints
/// `security: <name>: N attempts, N refused` and fails the test unless every
/// attempt was refused (and at least one was made).
pub struct Attempts {
    name: String,
    tried: u32,
    refused: u32,
    escaped: Vec<String>,
}

impl Attempts {
    pub fn new(name: &str) -> Attempts {
        Attempts {
            name: name.to_string(),
            tried: 0,
            refused: 0,
            escaped: vec![],
        }
    }

    /// Record one attempt: `refused` is true when the attack failed.
    pub fn record(&mut self, refused: bool, what: impl Into<String>) {
        self.tried += 1;
        if refused {
            self.refused += 1;
        } else {
            self.escaped.push(what.into());
        }
    }

    pub fn finish(self) {
        println!(
            "security: {}: {} attempts, {} refused",
            self.name, self.tried, self.refused
        );
        assert!(self.tried > 0, "{}: no attempt was made", self.name);
        assert!(
            self.escaped.is_empty(),
            "{}: {} of {} attempts were not refused: {:?}",
            self.name,
            self.tried - self.refused,
            self.tried,
            self.escaped
        );
    }
}
