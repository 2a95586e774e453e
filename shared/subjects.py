"""The NATS subject scheme: a public interface, defined only here.

    stackfleet.v1.dict.<type>.<host>     dictionary deltas (strings, mappings, functions,
                                         locations, stacks). Every aggregator replica and every
                                         ad-hoc reader subscribes to these *without* a queue
                                         group, so each has every stream's dictionary.
    stackfleet.v1.samples.<type>.<host>  sample batches referring to dictionary ids.
                                         Aggregator replicas share them through the queue group
                                         ``stackfleet-aggregators``; ad-hoc readers subscribe plainly.
    stackfleet.v1.resync                 anyone who lacks a dictionary asks for it here; the agent
                                         named in the request (or every agent, for host "*")
                                         re-sends its full dictionary on the dict subject.

Splitting dictionaries from samples is what lets a queue group spread sample load over
replicas while deltas stay decodable by every replica (see docs/wire-format.md).
"""

from __future__ import annotations

import re

from shared.profile_types import ProfileType

PREFIX = "stackfleet.v1"
QUEUE_GROUP = "stackfleet-aggregators"
RESYNC_SUBJECT = f"{PREFIX}.resync"
ALL_DICT_SUBJECTS = f"{PREFIX}.dict.>"
ALL_SAMPLE_SUBJECTS = f"{PREFIX}.samples.>"

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def host_token(host: str) -> str:
    """Make a host name usable as one NATS subject token (dots, spaces, wildcards replaced)."""
    token = _TOKEN_UNSAFE.sub("_", host)
    return token or "_"


def dict_subject(profile_type: ProfileType, host: str) -> str:
    """Subject carrying dictionary deltas of one host's stream of one profile type."""
    return f"{PREFIX}.dict.{profile_type.value}.{host_token(host)}"


def samples_subject(profile_type: ProfileType, host: str) -> str:
    """Subject carrying sample batches of one host's stream of one profile type."""
    return f"{PREFIX}.samples.{profile_type.value}.{host_token(host)}"


def samples_wildcard(profile_type: ProfileType | None = None, host: str | None = None) -> str:
    """Subscription subject for sample batches, optionally narrowed to a type and/or host."""
    t = profile_type.value if profile_type else "*"
    h = host_token(host) if host else "*"
    return f"{PREFIX}.samples.{t}.{h}"


def dict_wildcard(profile_type: ProfileType | None = None, host: str | None = None) -> str:
    """Subscription subject for dictionary deltas, optionally narrowed to a type and/or host."""
    t = profile_type.value if profile_type else "*"
    h = host_token(host) if host else "*"
    return f"{PREFIX}.dict.{t}.{h}"
