"""How fedtiny payloads ride in Flower messages: one raw-``stype`` Array of bytes.

A raw Array carries the payload bytes as they are (no ``np.save`` header), so the
byte count on the wire is the payload's own. Both apps and the bridge use these helpers:
the query (a node's partition), train message and reply layouts (one client, or a cohort
of virtual clients) are built and read here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.errors import PayloadError, UpdateError
from fedtiny.federated import messages as msg
from fedtiny.federated.client import ClientJob, LocalResult
from fedtiny.federated.rounds import Reply

__all__ = [
    "PAYLOAD",
    "TrainHeader",
    "bytes_record",
    "record_bytes",
    "train_content",
    "train_header",
    "train_jobs",
    "scheme_text",
    "reply_content",
    "update_content",
    "error_content",
    "parse_reply",
    "node_content",
    "node_partition",
]

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


def train_content(
    scenario_json: str,
    server_round: int,
    jobs: list[ClientJob],
    *,
    cohort: bool,
    state_dir: str = "",
    scheme_texts: dict[int, str] | None = None,
) -> RecordDict:
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
        cfg[msg.keyed(msg.SCHEME, pid)] = (
            "" if j.scheme is None else scheme_texts.get(j.partition_id) or j.scheme.to_json()
        )
        cfg[msg.keyed(msg.DOWNLINK, pid)] = j.kind
        records[msg.keyed(msg.GLOBAL, pid)] = bytes_record(j.downlink)
    return RecordDict({**records, msg.CONFIG: ConfigRecord(cfg)})


@dataclass(frozen=True)
class TrainHeader:
    """What a train message says of the whole round: the scenario, the round, a cohort or one client, and the
    simulation's state folder ("" on a real node)."""

    scenario_json: str
    server_round: int
    cohort: bool
    state_dir: str


def train_header(content: RecordDict) -> TrainHeader:
    cfg = content[msg.CONFIG]
    return TrainHeader(
        str(cfg[msg.SCENARIO]), int(cfg[msg.SERVER_ROUND]), msg.COHORT in cfg, str(cfg.get(msg.STATE_DIR, ""))
    )


def scheme_text(content: RecordDict, partition_id: int | None = None) -> str:
    """The scheme JSON a train message sends (a cohort's client ``partition_id``); "" when it sends none."""
    return str(content[msg.CONFIG].get(msg.keyed(msg.SCHEME, partition_id), ""))


def train_jobs(content: RecordDict, node_partition: int | None) -> list[ClientJob]:
    """The client jobs of a train message (a single-client message is the node's own partition)."""
    cfg = content[msg.CONFIG]
    cohort = [int(p) for p in cfg[msg.COHORT]] if msg.COHORT in cfg else None
    jobs = []
    for pid in cohort if cohort is not None else [None]:
        scheme = str(cfg.get(msg.keyed(msg.SCHEME, pid), ""))
        jobs.append(
            ClientJob(
                pid if pid is not None else int(node_partition),
                record_bytes(content[msg.keyed(msg.GLOBAL, pid)]),
                str(cfg.get(msg.keyed(msg.DOWNLINK, pid), "full")),
                ResolvedScheme.from_json(scheme) if scheme else None,
            )
        )
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
        out.update(_update_records(result.update, result.metrics(), result.info(), key))
    return RecordDict(out)


def _update_records(update: bytes, metrics: dict, info: dict, key: int | None) -> dict:
    return {
        msg.keyed(msg.UPDATE, key): bytes_record(update),
        msg.keyed(msg.METRICS, key): MetricRecord(metrics),
        msg.keyed(msg.INFO, key): ConfigRecord(info),
    }


def update_content(update: bytes, metrics: dict, num_examples: int, info: dict) -> RecordDict:
    """One client's reply from parts (a bridged device's): its update, metrics with its example count, info."""
    return RecordDict(_update_records(update, {**metrics, msg.NUM_EXAMPLES: num_examples}, info, None))


def error_content(error: str) -> RecordDict:
    """One client's reply saying why it has no update (the server rejects it as ``client error: ...``)."""
    return RecordDict({msg.INFO: ConfigRecord({msg.ERROR: error})})


def parse_reply(message: Message, sent: dict[int, list[int]]) -> list[Reply]:
    """A train reply as :class:`Reply` objects, one per client it answers for.

    ``sent`` maps each node to the partition ids it was sent this round. An error reply
    answers for all of them; a client a cohort reply leaves out, or one it reports as
    failed, gets ``Reply.error``; partitions the node was not sent are ignored.
    """
    pids = sent.get(message.metadata.src_node_id, [])
    if message.has_error():
        return [Reply(p, error=f"client error: {message.error.reason}") for p in pids or [-1]]
    # RecordDict's typed views are rebuilt on each access: take each once (a cohort reply has 3 records
    # per client, and per-client lookups through the views made parsing quadratic in the cohort size).
    configs, arrays, metric_records = (
        message.content.config_records,
        message.content.array_records,
        message.content.metric_records,
    )
    cfg = configs.get(msg.CONFIG)
    cohort = cfg is not None and msg.COHORT in cfg
    answered = {int(p) for p in cfg[msg.COHORT]} if cohort else set()
    replies = []
    for pid in pids or [-1]:
        key = pid if cohort else None
        info = configs.get(msg.keyed(msg.INFO, key))
        if cohort and (pid not in answered or info is None):
            replies.append(Reply(pid, error="client error: missing from its cohort's reply"))
            continue
        if info is not None and msg.ERROR in info:
            replies.append(Reply(pid, error=f"client error: {info[msg.ERROR]}"))
            continue
        try:
            payload = record_bytes(arrays.get(msg.keyed(msg.UPDATE, key)))
        except UpdateError as exc:
            replies.append(Reply(pid, error=str(exc)))
            continue
        metrics = metric_records.get(msg.keyed(msg.METRICS, key)) or {}
        replies.append(Reply(pid, payload, dict(metrics.items()), dict((info or {}).items())))
    return replies


def node_content(partition_id: int) -> RecordDict:
    """A node's answer to the server's query: the data partition it holds."""
    return RecordDict({msg.NODE: ConfigRecord({msg.PARTITION_ID: partition_id})})


def node_partition(content: RecordDict) -> int:
    """The partition id of a :func:`node_content` answer."""
    return int(content.config_records[msg.NODE][msg.PARTITION_ID])
