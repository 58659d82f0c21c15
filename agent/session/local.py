"""What this machine remembers of its session, in the state dir (never checkpointed).

``session.json`` (session id, start epoch, chain and the store it lives in,
the refs this session wrote) names its parent-state file, which is replaced by
generation so the two always agree: the new parent state is written under a
new name (as a checkpoint's walk goes), then ``session.json`` is switched to
it, then the old one is removed.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.checkpoint.manifest import LayerDesc
from agent.errors import AgentError, NoParentState
from agent.faults import crash_point
from agent.statedir import create_file, ensure_private_dir

SESSION_FILE = "session.json"
# A parent state, or one being written (the names leftovers.py clears too).
_PARENT_FILES = re.compile(r"parent-[0-9a-f]+\.state(\.tmp)?")


@dataclass(slots=True)
class LocalSession:
    """The contents of session.json."""

    studio: str
    session: str
    started: int
    name: str
    chain: list[LayerDesc] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # name -> manifest digest we wrote
    created: dict[str, str] = field(default_factory=dict)  # name -> first write (ISO)
    state_file: str = ""
    store: str = ""  # the URL of the store the chain's layers are in ("": not recorded)

    def to_json(self) -> dict[str, Any]:
        return {
            "studio": self.studio,
            "session": self.session,
            "started": self.started,
            "name": self.name,
            "chain": [layer.to_json() for layer in self.chain],
            "refs": self.refs,
            "created": self.created,
            "state_file": self.state_file,
            "store": self.store,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LocalSession:
        return cls(
            studio=d["studio"],
            session=d["session"],
            started=int(d["started"]),
            name=d["name"],
            chain=[LayerDesc.from_json(x) for x in d["chain"]],
            refs=dict(d["refs"]),
            created=dict(d.get("created", {})),
            state_file=d["state_file"],
            store=str(d.get("store", "")),
        )


class LocalState:
    """The session files of one studio in one state dir, with the loaded session
    kept in memory once read or written."""

    def __init__(self, state_dir: Path, studio: str, root: Path) -> None:
        self.state_dir = state_dir
        self._studio = studio
        self._root = root
        self._local: LocalSession | None = None

    def current(self) -> LocalSession:
        """The session on this root; there must be one."""
        if self._local is None:
            self._local = self.load()
        if self._local is None:
            raise NoParentState(
                f"no session on {self._root}: run 'studio-agent baseline' or 'restore' first"
            )
        return self._local

    def peek(self) -> LocalSession | None:
        """The session on this root if there is one (what is on disk is not cached)."""
        return self._local or self.load()

    def load(self) -> LocalSession | None:
        path = self.state_dir / SESSION_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise AgentError(f"session file {path} is unreadable ({e}); run baseline again") from e
        local = LocalSession.from_json(data)
        if local.studio != self._studio:
            raise AgentError(
                f"the state dir {self.state_dir} holds a session of studio {local.studio!r}, "
                f"not {self._studio!r}; run baseline or restore for this studio"
            )
        return local

    def new_state(self) -> Path:
        """A new parent state's name, unused, for a walk to write (``save`` switches to it)."""
        ensure_private_dir(self.state_dir, self._root)
        return self.state_dir / f"parent-{uuid.uuid4().hex[:12]}.state"

    def save(self, local: LocalSession, state: Path | None) -> None:
        """Switch session.json to the parent state ``state`` (a file ``new_state``
        named, written whole, or the one it names already), then remove the
        previous one and any left by a checkpoint stopped before it got here."""
        ensure_private_dir(self.state_dir, self._root)
        if state is not None:
            crash_point("state")
            local.state_file = state.name
        path = self.state_dir / SESSION_FILE
        tmp = path.with_name(path.name + ".tmp")
        with os.fdopen(create_file(tmp), "w") as f:
            json.dump(local.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if state is not None:
            for other in self.state_dir.glob("parent-*.state*"):
                if other.name != local.state_file and _PARENT_FILES.fullmatch(other.name):
                    other.unlink(missing_ok=True)
        self._local = local

    def parent_state(self, local: LocalSession) -> Path:
        """The file of the root as the session's chain records it."""
        path = self.state_dir / local.state_file
        if not local.state_file or not path.is_file():
            raise NoParentState(
                f"parent state of session {local.session} is missing; run baseline again"
            )
        return path
