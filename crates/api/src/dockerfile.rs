//! The Dockerfile subset a template build runs (issue 12): `FROM` (a
//! template or an image reference, first and once), `RUN` (shell form,
//! `/bin/sh -c`, or exec form `["prog", "arg"]`), `COPY src... dst` (from
//! the uploaded context; no flags), `ENV k=v ...` / `ENV k v`, `WORKDIR`,
//! `USER`. Comments (`#`), blank lines and `\` continuations as Docker
//! reads them. Anything else is refused naming its line.
//!
//! Owns: parsing and the limits on the text. Must not: know how a step is
//! run or where the context lives.

use crate::Invalid;

/// Longest Dockerfile accepted.
pub const MAX_DOCKERFILE_BYTES: usize = 64 * 1024;
/// Most steps (instructions after `FROM`).
pub const MAX_STEPS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The argv to run (`/bin/sh -c <text>` for the shell form).
    Run(Vec<String>),
    /// Context paths and the destination in the image.
    Copy {
        src: Vec<String>,
        dst: String,
    },
    /// Variables to set, in order.
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
}

/// One step: its 1-based line, its text as written (for logs and reasons).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub line: usize,
    pub text: String,
    pub step: Step,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// What `FROM` names: a template (id or name) or an image reference.
    pub from: String,
    pub steps: Vec<Instruction>,
}

const FIELD: &str = "dockerfile";

fn bad(line: usize, msg: impl std::fmt::Display) -> Invalid {
    Invalid::new(FIELD, format!("line {line}: {msg}"))
}

/// A JSON array of strings (exec form), if `rest` is one.
fn json_array(rest: &str) -> Option<Vec<String>> {
    if !rest.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(rest).ok()
}

fn unquote(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() >= 2
        && ((b[0] == b'"' && b[b.len() - 1] == b'"') || (b[0] == b'\'' && b[b.len() - 1] == b'\''))
    {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

fn valid_env_key(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Split on whitespace, keeping double-quoted parts together.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                any = true;
            }
            None if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            None => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parse `text`; every refusal names the field `dockerfile` and the line.
pub fn parse(text: &str) -> Result<Dockerfile, Invalid> {
    if text.len() > MAX_DOCKERFILE_BYTES {
        return Err(Invalid::new(
            FIELD,
            format!("at most {MAX_DOCKERFILE_BYTES} bytes"),
        ));
    }
    // Logical lines: continuations joined, comments and blanks dropped.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if pending.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if pending.is_some() && trimmed.starts_with('#') {
            continue; // comment lines inside a continuation are dropped
        }
        let (start, mut acc) = pending.take().unwrap_or((n, String::new()));
        if let Some(head) = trimmed.strip_suffix('\\') {
            acc.push_str(head);
            acc.push(' ');
            pending = Some((start, acc));
        } else {
            acc.push_str(trimmed);
            logical.push((start, acc));
        }
    }
    if let Some((start, acc)) = pending {
        logical.push((start, acc));
    }
    let mut from: Option<String> = None;
    let mut steps = Vec::new();
    for (line, text) in logical {
        let (word, rest) = match text.split_once(char::is_whitespace) {
            Some((w, r)) => (w, r.trim()),
            None => (text.as_str(), ""),
        };
        let instr = word.to_ascii_uppercase();
        if from.is_none() && instr != "FROM" {
            return Err(bad(
                line,
                format!("the first instruction must be FROM, not {word}"),
            ));
        }
        if rest.is_empty() {
            return Err(bad(line, format!("{instr} needs an argument")));
        }
        let step = match instr.as_str() {
            "FROM" => {
                if from.is_some() {
                    return Err(bad(line, "only one FROM (no multi-stage builds)"));
                }
                let w = words(rest);
                if w.len() != 1 || w[0].starts_with("--") {
                    return Err(bad(
                        line,
                        "FROM takes one template or image (no AS, no flags)",
                    ));
                }
                from = Some(w[0].clone());
                continue;
            }
            "RUN" => {
                if rest.starts_with("--") {
                    return Err(bad(line, "RUN flags are not supported"));
                }
                match json_array(rest) {
                    Some(argv) if !argv.is_empty() => Step::Run(argv),
                    Some(_) => return Err(bad(line, "RUN with an empty command")),
                    None if rest.starts_with('[') => {
                        return Err(bad(line, "RUN [..] is not a JSON array of strings"))
                    }
                    None => Step::Run(vec!["/bin/sh".into(), "-c".into(), rest.to_string()]),
                }
            }
            "COPY" => {
                if rest.starts_with("--") {
                    return Err(bad(
                        line,
                        "COPY flags (--from, --chown, ...) are not supported",
                    ));
                }
                let mut parts = match json_array(rest) {
                    Some(a) => a,
                    None => words(rest),
                };
                if parts.len() < 2 {
                    return Err(bad(line, "COPY needs a source and a destination"));
                }
                let dst = parts.pop().unwrap_or_default();
                Step::Copy { src: parts, dst }
            }
            "ENV" => {
                let mut vars = Vec::new();
                if rest.contains('=')
                    && rest
                        .split_once(char::is_whitespace)
                        .is_none_or(|(first, _)| first.contains('='))
                {
                    for w in words(rest) {
                        let Some((k, v)) = w.split_once('=') else {
                            return Err(bad(line, format!("ENV: '{w}' is not KEY=value")));
                        };
                        vars.push((k.to_string(), unquote(v)));
                    }
                } else {
                    let (k, v) = rest
                        .split_once(char::is_whitespace)
                        .ok_or_else(|| bad(line, "ENV needs KEY=value or KEY value"))?;
                    vars.push((k.to_string(), unquote(v.trim())));
                }
                for (k, _) in &vars {
                    if !valid_env_key(k) {
                        return Err(bad(line, format!("ENV: '{k}' is not a variable name")));
                    }
                }
                Step::Env(vars)
            }
            "WORKDIR" => Step::Workdir(unquote(rest)),
            "USER" => {
                let u = unquote(rest);
                if u.contains(char::is_whitespace) {
                    return Err(bad(line, "USER takes one user[:group]"));
                }
                Step::User(u)
            }
            _ => {
                return Err(bad(
                    line,
                    format!("{word} is not supported (FROM, RUN, COPY, ENV, WORKDIR, USER)"),
                ))
            }
        };
        steps.push(Instruction {
            line,
            text: text.clone(),
            step,
        });
        if steps.len() > MAX_STEPS {
            return Err(bad(line, format!("more than {MAX_STEPS} steps")));
        }
    }
    let from = from.ok_or_else(|| Invalid::new(FIELD, "no FROM"))?;
    Ok(Dockerfile { from, steps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subset_parses() {
        let d = parse(
            "# c\nFROM default\nRUN echo a \\\n  && echo b\nRUN [\"/bin/echo\", \"x\"]\nCOPY app.py lib/ /app/\nENV A=1 B=\"two words\"\nENV C three four\nWORKDIR /app\nUSER 1000:1000\n",
        )
        .unwrap();
        assert_eq!(d.from, "default");
        assert_eq!(d.steps.len(), 7);
        assert_eq!(
            d.steps[0].step,
            Step::Run(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo a  && echo b".into()
            ])
        );
        assert_eq!(d.steps[0].line, 3);
        assert_eq!(
            d.steps[1].step,
            Step::Run(vec!["/bin/echo".into(), "x".into()])
        );
        assert_eq!(
            d.steps[2].step,
            Step::Copy {
                src: vec!["app.py".into(), "lib/".into()],
                dst: "/app/".into()
            }
        );
        assert_eq!(
            d.steps[3].step,
            Step::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into())
            ])
        );
        assert_eq!(
            d.steps[4].step,
            Step::Env(vec![("C".into(), "three four".into())])
        );
        assert_eq!(d.steps[6].step, Step::User("1000:1000".into()));
    }

    #[test]
    fn refusals_name_the_line() {
        for (text, line) in [
            ("FROM a\nEXPOSE 80\n", "line 2"),
            ("RUN x\n", "line 1"),
            ("FROM a\nFROM b\n", "line 2"),
            ("FROM a AS b\n", "line 1"),
            ("FROM a\n\nCOPY --from=x a b\n", "line 3"),
            ("FROM a\nENV 1A=2\n", "line 2"),
            ("FROM a\nRUN\n", "line 2"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.field, "dockerfile");
            assert!(e.message.contains(line), "{text:?}: {}", e.message);
        }
        assert!(parse("").is_err());
        assert!(parse(&"#".repeat(MAX_DOCKERFILE_BYTES + 1)).is_err());
    }
}
