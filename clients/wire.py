"""How fedtiny payloads ride in Flower messages: one raw-``stype`` Array of bytes.

A raw Array carries the payload bytes as they are (no ``np.save`` header), so the
byte count on the wire is the payload's own. Both apps use these helpers, and the
train message and reply layouts (one client, or a cohort of virtual clients) are built
and read here and nowhere else.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.errors import PayloadError
from fedtiny.federated import messages as msg
from fedtiny.federated.client import ClientJob, LocalResult

__all__ = ["PAYLOAD", "bytes_record", "record_bytes", "train_content", "train_jobs", "reply_content"]

PAYLOAD = "payload"
_STYPE = "raw"


def bytes_record(data: bytes) -> ArrayRecord:
    """Wrap payload bytes as an ArrayRecord with a single raw Array."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype=_STYPE, data=bytes(data))})


def record_bytes(record: object) -> bytes:
    """Return the payload bytes of a record made by :func:`bytes_record`; PayloadError otherwise."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD]:
        raise PayloadError(f"expected one array named {PAYLOAD!r}, got {sorted(record.keys())}")
    arr = record[PAYLOAD]
    if arr.stype != _STYPE or arr.dtype != "uint8":
        raise PayloadError(f"payload array must be raw uint8, got stype={arr.stype!r} dtype={arr.dtype!r}")
    return arr.data


def train_content(scenario_json: str, server_round: int, jobs: list[ClientJob], *, cohort: bool,
                  state_dir: str = "", scheme_texts: dict[int, str] | None = None) -> RecordDict:
    """A train message's content for one client (``cohort=False``) or a cohort of virtual clients.

    ``scheme_texts``: each partition's scheme as JSON when the caller has it already.
    """
    scheme_texts = scheme_texts or {}
    cfg: dict = {msg.SCENARIO: scenario_json, msg.SERVER_ROUND: server_round}
    if state_dir:
        cfg[msg.STATE_DIR] = state_dir
    if cohort:
        cfg[msg.COHORT] = [j.partition_id for j in jobs]
    records: dict = {}
    for j in jobs:
        pid = j.partition_id if cohort else None
        cfg[msg.keyed(msg.SCHEME, pid)] = ("" if j.scheme is None else scheme_texts.get(j.partition_id)
                                           or j.scheme.to_json())
        cfg[msg.keyed(msg.DOWNLINK, pid)] = j.kind
        records[msg.keyed(msg.GLOBAL, pid)] = bytes_record(j.downlink)
    return RecordDict({**records, msg.CONFIG: ConfigRecord(cfg)})


def train_jobs(content: RecordDict, node_partition: int | None) -> list[ClientJob]:
    """The client jobs of a train message (a single-client message is the node's own partition)."""
    cfg = content[msg.CONFIG]
    cohort = [int(p) for p in cfg[msg.COHORT]] if msg.COHORT in cfg else None
    jobs = []
    for pid in cohort if cohort is not None else [None]:
        scheme = str(cfg.get(msg.keyed(msg.SCHEME, pid), ""))
        jobs.append(ClientJob(pid if pid is not None else int(node_partition),
                              record_bytes(content[msg.keyed(msg.GLOBAL, pid)]),
                              str(cfg.get(msg.keyed(msg.DOWNLINK, pid), "full")),
                              ResolvedScheme.from_json(scheme) if scheme else None))
    return jobs


def reply_content(results: list[tuple[int, LocalResult | str]], *, cohort: bool) -> RecordDict:
    """A train reply's content: each client's update, metrics and info (or, in a cohort, its error)."""
    out: dict = {}
    if cohort:
        out[msg.CONFIG] = ConfigRecord({msg.COHORT: [pid for pid, _ in results]})
    for pid, result in results:
        key = pid if cohort else None
        if isinstance(result, str):
            if not cohort:  # a single client's failure is the ClientApp's: Flower turns it into an error reply
                raise RuntimeError(result)
            out[msg.keyed(msg.INFO, key)] = ConfigRecord({msg.ERROR: result})
            continue
        out[msg.keyed(msg.UPDATE, key)] = bytes_record(result.update)
        out[msg.keyed(msg.METRICS, key)] = MetricRecord(result.metrics())
        out[msg.keyed(msg.INFO, key)] = ConfigRecord(result.info())
    return RecordDict(out)
