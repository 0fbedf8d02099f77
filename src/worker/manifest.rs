//! What a worker says about itself in its handshake reply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One command a worker offers: its flags, documentation and argument schema.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// The command's name: its key in the manifest's `commands` object (set by
    /// [`Manifest::from_handshake`], never read from the entry).
    #[serde(skip_deserializing)]
    pub name: String,
    /// Whether the command changes session state, so the session journal records it.
    #[serde(default)]
    pub mutates_session: bool,
    /// Only the pool sends it (e.g. `shutdown`); callers are refused.
    #[serde(default)]
    pub internal: bool,
    /// It may run while other concurrent calls run on the same worker (an `async`
    /// handler); else it has the worker to itself.
    #[serde(default)]
    pub concurrent: bool,
    /// Its handler yields chunks before its result (a generator).
    #[serde(default)]
    pub streams: bool,
    /// A session snapshot covers the state it changes, so a journal holding it can be
    /// compacted.
    #[serde(default)]
    pub snapshot: bool,
    /// The Python module that defines it.
    #[serde(default)]
    pub module: Option<String>,
    /// The first line of the handler's documentation.
    #[serde(default)]
    pub doc: String,
    /// The JSON Schema of the command's `args` object, as the worker declared it, if it
    /// did. It documents the arguments for callers; calls are not checked against it.
    #[serde(default)]
    pub args_schema: Option<Value>,
}

/// A worker's manifest. Protocol-v1 scripts that send none get the empty manifest:
/// no command is known to mutate session state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The runtime's name, `snakepool_worker` for ours.
    #[serde(default)]
    pub runtime: Option<String>,
    /// The runtime's version.
    #[serde(default)]
    pub runtime_version: Option<String>,
    /// The protocol version the worker speaks.
    #[serde(default)]
    pub protocol_version: Option<u64>,
    /// The worker's process id as it sees it.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The interpreter's version, e.g. `3.11.7`.
    #[serde(default)]
    pub python_version: Option<String>,
    /// Commands by name.
    #[serde(default)]
    pub commands: BTreeMap<String, CommandInfo>,
    /// Present when the worker runs several calls at once (protocol addition).
    #[serde(default)]
    pub concurrency: Option<Concurrency>,
}

/// What a worker that runs several calls at once announces.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Concurrency {
    /// Most calls it runs at once.
    pub max_concurrency: usize,
    /// Chunks of one stream it sends before waiting for credit.
    #[serde(default)]
    pub stream_window: usize,
    /// Sync calls may be sent ahead: they run in order, each only once the replies
    /// before it are wholly in the pipe.
    #[serde(default)]
    pub pipelining: bool,
}

impl Manifest {
    /// Reads the manifest from a handshake `ping` result; anything missing stays empty.
    pub fn from_handshake(result: &Value) -> Self {
        let mut manifest: Manifest = result
            .get("manifest")
            .and_then(|m| serde_json::from_value(m.clone()).ok())
            .unwrap_or_default();
        for (name, info) in &mut manifest.commands {
            info.name.clone_from(name);
        }
        manifest
    }

    /// The commands not flagged internal, in name order: those callers may send (the
    /// pool refuses a few more whatever the manifest says; see
    /// [`crate::pool::INTERNAL_COMMANDS`]).
    pub fn public_commands(&self) -> impl Iterator<Item = &CommandInfo> {
        self.commands.values().filter(|info| !info.internal)
    }

    /// Whether `command` is flagged as changing session state.
    pub fn mutates_session(&self, command: &str) -> bool {
        self.commands
            .get(command)
            .is_some_and(|info| info.mutates_session)
    }

    /// Whether a session snapshot covers what `command` changes.
    pub fn snapshot_covers(&self, command: &str) -> bool {
        self.commands.get(command).is_some_and(|info| info.snapshot)
    }

    /// `command`, and the module defining it if the worker said, for messages.
    pub fn describe_command(&self, command: &str) -> String {
        match self
            .commands
            .get(command)
            .and_then(|info| info.module.as_deref())
        {
            Some(module) => format!("`{command}` (module `{module}`)"),
            None => format!("`{command}`"),
        }
    }

    /// The commands flagged as internal: only the pool may send them.
    pub fn internal_commands(&self) -> std::collections::BTreeSet<String> {
        self.commands
            .iter()
            .filter(|(_, info)| info.internal)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether `command` may overlap other concurrent calls on this worker: the worker
    /// announces concurrency and flags the command.
    pub fn is_concurrent(&self, command: &str) -> bool {
        self.concurrency
            .as_ref()
            .is_some_and(|c| c.max_concurrency > 1)
            && self
                .commands
                .get(command)
                .is_some_and(|info| info.concurrent)
    }

    /// Whether a call of `command` can be cancelled with a cancel frame: the worker
    /// runs it as a task of its event loop (an `async` handler or a generator).
    pub fn cancellable(&self, command: &str) -> bool {
        self.concurrency.is_some()
            && self
                .commands
                .get(command)
                .is_some_and(|info| info.concurrent || info.streams)
    }

    /// Whether calls of `command` may be sent ahead of the worker's earlier calls: the
    /// worker announces pipelining and runs the command inline, one call after another
    /// in arrival order (a sync handler that is not a generator).
    pub fn pipelines(&self, command: &str) -> bool {
        self.concurrency.as_ref().is_some_and(|c| c.pipelining)
            && self
                .commands
                .get(command)
                .is_some_and(|info| !info.concurrent && !info.streams)
    }

    /// Chunks of one stream the worker sends before it waits for credit (0 when it
    /// does not stream).
    pub fn stream_window(&self) -> usize {
        self.concurrency.as_ref().map_or(0, |c| c.stream_window)
    }

    /// How many calls the worker runs at once: its announced maximum, else 1.
    pub fn max_concurrency(&self) -> usize {
        self.concurrency
            .as_ref()
            .map_or(1, |c| c.max_concurrency.max(1))
    }

    /// Whether the worker declared `command`.
    pub fn has_command(&self, command: &str) -> bool {
        self.commands.contains_key(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_flags_and_tolerates_absence() {
        let manifest = Manifest::from_handshake(&json!({
            "status": "ok",
            "manifest": {"runtime": "snakepool_worker", "protocol_version": 1, "pid": 42,
                          "commands": {"set": {"mutates_session": true}, "get": {},
                                       "shutdown": {"internal": true}}}
        }));
        assert!(manifest.mutates_session("set"));
        assert!(!manifest.mutates_session("get"));
        assert!(!manifest.mutates_session("missing"));
        assert_eq!(manifest.pid, Some(42));
        assert_eq!(
            manifest.internal_commands().into_iter().collect::<Vec<_>>(),
            ["shutdown"]
        );
        assert_eq!(
            Manifest::from_handshake(&json!("pong")),
            Manifest::default()
        );
    }

    #[test]
    fn keeps_names_docs_and_argument_schemas() {
        let schema = json!({"type": "object", "properties": {"key": {"type": "string"}},
                            "required": ["key"]});
        let manifest = Manifest::from_handshake(&json!({
            "manifest": {"commands": {
                "get": {"doc": "Read args.key.", "args_schema": schema},
                "ping": {"doc": "Liveness check.", "args_schema": null},
                "shutdown": {"internal": true, "args_schema": {"type": "object"}},
                "forged": {"name": "other", "streams": true}
            }}
        }));
        let public: Vec<&CommandInfo> = manifest.public_commands().collect();
        let names: Vec<&str> = public.iter().map(|info| info.name.as_str()).collect();
        assert_eq!(names, ["forged", "get", "ping"]);
        assert_eq!(public[1].doc, "Read args.key.");
        assert_eq!(public[1].args_schema.as_ref(), Some(&schema));
        assert_eq!(public[2].args_schema, None);
        assert!(public[0].streams);
        assert_eq!(manifest.commands["shutdown"].name, "shutdown");
    }
}
