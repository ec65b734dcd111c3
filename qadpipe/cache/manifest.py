"""Task manifests: the commit point of a cache, and how several writers make one cache.

Each writer task owns ``manifests/<task>.json`` and the shards named ``shards/<task>-*``;
it replaces its manifest atomically after every shard it writes, so a shard absent from
every manifest does not exist (a killed writer's half-written or unlisted file is ignored
and later overwritten).  Readers merge all task manifests into one :class:`CacheView`
(tasks in name order, shards in commit order) — there is no separate merge step, and no
two tasks ever write the same file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from qadpipe.cache.schema import FORMAT_VERSION, CacheMeta
from qadpipe.cache.store import Store
from qadpipe.errors import CacheError

MANIFEST_DIR = "manifests"
SHARD_DIR = "shards"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: The most tasks one cache is split into: task names have five digits (task-00000 ... task-99999),
#: and a manifest claiming more (a damaged one) must not make readers list billions of names.
MAX_TASKS = 100_000


@dataclass(frozen=True)
class ShardEntry:
    name: str        # relative to the cache root, always "shards/<file>.parquet"
    rows: int
    tokens: int      # target positions
    bytes: int
    sha256: str
    #: input tokens of the shard's longest row: distill checks its pack_length against it
    #: before training (None in manifests written before qadpipe recorded it).
    longest_row: int | None = None


@dataclass
class TaskManifest:
    """``num_tasks``: how many ways the run that wrote this task split the records (None
    for a writer outside a task array, and in manifests older than the field).
    ``complete``: whether the task committed every row it was given (False while it runs or
    after a stop at a time limit; None in manifests older than the field)."""

    task: str
    meta: CacheMeta
    shards: list[ShardEntry] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    num_tasks: int | None = None
    complete: bool | None = False

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "task": self.task, "meta": self.meta.to_dict(),
                           "versions": self.versions, "shards": [asdict(s) for s in self.shards],
                           "num_tasks": self.num_tasks, "complete": self.complete}, indent=1, sort_keys=True)


@dataclass
class CacheView:
    """All committed shards of a cache, merged over its task manifests."""

    meta: CacheMeta
    tasks: list[TaskManifest]

    @property
    def shards(self) -> list[ShardEntry]:
        return [shard for task in self.tasks for shard in task.shards]

    @property
    def missing_tasks(self) -> list[str]:
        """Tasks of the array that wrote this cache with no manifest yet (still running, failed
        or never submitted): known when every manifest records the same ``num_tasks``."""
        counts = {task.num_tasks for task in self.tasks}
        if len(counts) != 1 or None in counts:
            return []
        present = {task.task for task in self.tasks}
        return [name for name in map(task_name, range(counts.pop())) if name not in present]

    @property
    def split_ways(self) -> list[int]:
        """The different ``num_tasks`` the tasks were written with, when there are several: two
        arrays (or resubmissions) that split the records differently and started together, each
        before the other's first manifest, so the writer's check saw neither; some records are
        then in no task.  Empty for a consistent cache."""
        ways = sorted({task.num_tasks for task in self.tasks if task.num_tasks is not None})
        return ways if len(ways) > 1 else []

    @property
    def incomplete_tasks(self) -> list[str]:
        """Tasks whose manifest says they stopped before committing all their rows."""
        return [task.task for task in self.tasks if task.complete is False]

    @property
    def fingerprint(self) -> str:
        """sha256 over the committed shards' names and checksums: equal exactly when two views
        hold the same rows in the same order, wherever the cache lives (so a resumed run can tell
        a cache regenerated in place from the one it trained on)."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.name}\0{shard.sha256}\n".encode())
        return digest.hexdigest()


def task_name(index: int) -> str:
    """The name task ``index`` of a ``qadpipe generate`` array writes under."""
    return f"task-{index:05d}"


def check_task_name(task: str) -> str:
    if not _SAFE_NAME.fullmatch(task) or ".." in task:
        raise CacheError(f"cache task name {task!r}: expected letters, digits, '_', '-', '.' (e.g. task-00003)")
    return task


def manifest_path(task: str) -> str:
    return f"{MANIFEST_DIR}/{check_task_name(task)}.json"


def shard_path(task: str, index: int) -> str:
    return f"{SHARD_DIR}/{check_task_name(task)}-{index:06d}.parquet"


def _shard_entry(raw: object, source: str) -> ShardEntry:
    try:
        entry = ShardEntry(**raw)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CacheError(f"{source}: malformed shard entry {raw!r}") from exc
    counts = (entry.rows, entry.tokens, entry.bytes, 0 if entry.longest_row is None else entry.longest_row)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) \
            or not isinstance(entry.name, str) or not isinstance(entry.sha256, str):
        raise CacheError(f"{source}: malformed shard entry {raw!r}: expected a string name and sha256 and "
                         "non-negative integer rows, tokens, bytes and longest_row (or no longest_row)")
    prefix, _, base = entry.name.partition("/")
    if prefix != SHARD_DIR or not _SAFE_NAME.fullmatch(base) or ".." in base or not base.endswith(".parquet"):
        raise CacheError(
            f"{source}: shard name {entry.name!r} is not a file directly under {SHARD_DIR}/ "
            "(names that escape the cache directory are refused)"
        )
    return entry


def parse_manifest(text: str, source: str) -> TaskManifest:
    """A task manifest from its JSON text; CacheError naming ``source`` on anything wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError:   # thousands of nested brackets: no manifest qadpipe writes
        raise CacheError(f"{source}: not a manifest (JSON nested too deeply to read)") from None
    if not isinstance(raw, dict):
        raise CacheError(f"{source}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{source}: format_version={raw.get('format_version')!r}, "
                         f"this qadpipe reads format_version={FORMAT_VERSION}")
    meta = CacheMeta.from_dict(raw.get("meta"), source)
    if not isinstance(raw.get("shards", []), list):
        raise CacheError(f"{source}: shards={raw.get('shards')!r}, expected a list of shard entries")
    task = check_task_name(str(raw.get("task")))
    shards = [_shard_entry(entry, source) for entry in raw.get("shards", [])]
    own = re.compile(rf"{SHARD_DIR}/{re.escape(task)}-\d{{6}}\.parquet")
    foreign = next((shard.name for shard in shards if not own.fullmatch(shard.name)), None)
    if foreign is not None:   # a task writes only its own names; another's shard would be read twice
        raise CacheError(f"{source}: lists shard {foreign}, not one of task {task}'s own "
                         f"({SHARD_DIR}/{task}-NNNNNN.parquet): a shard listed by two tasks is read twice")
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise CacheError(f"{source}: shard {twice} is listed twice (its rows would be read twice)")
    complete = raw.get("complete")
    if complete not in (True, False, None):
        raise CacheError(f"{source}: complete={complete!r}, expected true, false or null")
    num_tasks = raw.get("num_tasks")
    if num_tasks is not None and (not isinstance(num_tasks, int) or isinstance(num_tasks, bool)
                                  or not 1 <= num_tasks <= MAX_TASKS):
        raise CacheError(f"{source}: num_tasks={num_tasks!r}, expected an integer in [1, {MAX_TASKS}] or null")
    return TaskManifest(task=task, meta=meta, shards=shards,
                        versions=raw.get("versions", {}), num_tasks=num_tasks, complete=complete)


def load_manifests(store: Store) -> list[TaskManifest]:
    """Every task manifest of the cache, in task-name order (empty list: nothing committed)."""
    manifests = []
    for name in store.list(MANIFEST_DIR):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        rel = f"{MANIFEST_DIR}/{name}"
        manifest = parse_manifest(store.read_bytes(rel).decode("utf-8", "replace"), store.describe(rel))
        if f"{manifest.task}.json" != name:
            raise CacheError(f"{store.describe(rel)}: names task {manifest.task!r}, expected {name[:-5]!r}")
        manifests.append(manifest)
    return manifests


def meta_difference(a: CacheMeta, b: CacheMeta) -> tuple[str, str] | None:
    """('k=64', 'k=32') for the first identity field where two metas differ, else None.  A
    data fingerprint (a hash) is explained by the data/generate settings that changed."""
    left, right = a.identity(), b.identity()
    # what decides which settings count first: a sampled cache's k counts only when drawn from the top-k
    for key in dict.fromkeys(["target_kind", "sampled_from", *left, *right]):
        if left.get(key) != right.get(key):
            why = _data_settings_changed(a.config, b.config) if key == "data_fingerprint" else ""
            return f"{key}={left.get(key)!r}", f"{key}={right.get(key)!r}{why}"
    return None


def _data_settings_changed(old: dict, new: dict) -> str:
    """' (generate.temperature 0.7 -> 1.2)': what of the recorded configs shapes the data."""
    from qadpipe.config import flatten_config

    sections = ("data", "generate")
    before = flatten_config({k: old.get(k) or {} for k in sections})
    after = flatten_config({k: new.get(k) or {} for k in sections})
    per_task = ("generate.num_shards", "generate.shard_index")   # differ between the tasks of one cache
    changed = [f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key) and key not in per_task]
    if changed:
        return f" ({'; '.join(changed[:3])})"
    return (" (same data and generate settings: the data source's bytes, the chat template, or how the qadpipe "
            "that made the cache renders them changed; its runs/<task>/qadpipe_run.yaml names that qadpipe)")


def load_view(store: Store) -> CacheView:
    """Merge the task manifests; refuse an empty cache or tasks that disagree on the meta."""
    tasks = load_manifests(store)
    if not tasks and store.local:   # say what the path is, not "empty": a typo must not look like a lost cache
        if not store.base.exists():
            raise CacheError(f"{store.base}: no cache here (the path does not exist)")
        if not store.base.is_dir():
            raise CacheError(f"{store.base}: a file, expected a cache directory")
        if not (store.base / MANIFEST_DIR).is_dir():
            raise CacheError(f"{store.base}: not a cache (no {MANIFEST_DIR}/ directory)")
    if not tasks and not store.local:   # an object store cannot tell a missing prefix from an empty one
        raise CacheError(f"{store.describe(MANIFEST_DIR)}: no task manifest found (no cache at this URI, or one "
                         "that committed nothing yet; check the bucket, path and endpoint)")
    if not tasks or not any(task.shards for task in tasks):
        raise CacheError(f"{store.describe(MANIFEST_DIR)}: empty cache (no committed shards)")
    first = tasks[0]
    for task in tasks[1:]:
        difference = meta_difference(first.meta, task.meta)
        if difference:
            raise CacheError(
                f"{store.describe(manifest_path(task.task))}: disagrees with "
                f"{store.describe(manifest_path(first.task))}: {difference[1]} vs {difference[0]}"
            )
    return CacheView(meta=first.meta, tasks=tasks)
