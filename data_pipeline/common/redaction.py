"""What counts as a secret, in one place: the names (of variables, options, headers, query parameters) that hold
one, and the parts of a value that carry one: a URL's user:password@ and signed query parameters, and in a
command, `-u user:password`, `--password=...`, a secret header (`-H 'Authorization: ...'`) or a secret variable
(`PGPASSWORD=... psql`).

Whatever the project writes or prints about a run (its saved config, W&B's config, launch records, sbatch scripts,
messages naming a location) goes through `redact_text` or `redacted_tree`; the run itself keeps the real values.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

# Pieces of a name, split at anything but letters and digits: WANDB_API_KEY, HF_TOKEN, X-Amz-Signature, sig,
# MYSQL_PWD (a name that is only PWD is the working directory), Proxy-Authorization, --oauth2-bearer.
SECRET_NAME_PARTS = frozenset({
    "KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS",
    "SIG", "SIGNATURE", "AUTHORIZATION", "BEARER", "COOKIE", "DSN",
})
# Names run together, or that hold a connection string with its password: PGPASSWORD, SSHPASS, DATABASE_URL,
# AZURE_STORAGE_CONNECTION_STRING.
SECRET_NAME_ENDINGS = ("PASSWORD", "PASSWD", "PASS", "TOKEN", "SECRET", "APIKEY", "_PWD", "DATABASE_URL",
                       "DATABASE_URI", "CONNECTION_STRING")


def looks_secret(name: str) -> bool:
    """Whether a variable, option, header or query parameter of this name holds a secret."""
    upper = name.upper()
    return not SECRET_NAME_PARTS.isdisjoint(re.split(r"[^A-Z0-9]+", upper)) or upper.endswith(SECRET_NAME_ENDINGS)


# Each pattern's `value` group is replaced where its `name` looks secret (or always, for a pattern with no name).
# A value may sit in quotes (a header in a command); `quote` then bounds it instead of the next space (or & or ;,
# which end a value in a query and in a shell command alike).
_VALUE = r"(?P<quote>['\"]+)?(?P<value>(?(quote)[^'\"\n]*|[^\s'\"&;]*))"
_PATTERNS = [
    # scheme://user:password@host, and scheme://token@host
    re.compile(r"://(?:[^\s/@:'\"]*:)?(?P<value>[^\s/@'\"]+)@"),
    # ?X-Amz-Signature=..., &sig=..., &token=...
    re.compile(r"[?&;](?P<name>[^\s=&#?;'\"]+)=(?P<value>[^\s&#;'\"]*)"),
    # -H 'Authorization: Bearer ...', --header=X-Api-Key:...
    re.compile(r"(?<![\w-])(?:-H|--header)(?:=|\s+)(?P<quote>['\"]+)?(?P<name>[\w-]+):\s*"
               r"(?P<value>(?(quote)[^'\"\n]*|\S*))"),
    # -u user:password, -Uuser:password, --user=user:password, --proxy-user user:password
    re.compile(r"(?<![\w-])(?:-u|-U|--user|--proxy-user)(?:=|\s+)?['\"]*[^\s:'\"]*:(?P<value>[^\s'\"]+)"),
    # --password=..., --http-password ..., --token ...
    re.compile(r"(?<![\w-])--(?P<name>[A-Za-z][\w-]*)(?:=|\s+)" + _VALUE),
    # PGPASSWORD=... psql, export AWS_SECRET_ACCESS_KEY=...
    re.compile(r"(?<![\w$-])(?P<name>[A-Za-z_]\w*)=" + _VALUE),
]


def _redact_match(match: re.Match) -> str:
    name = match.groupdict().get("name")
    if (name is not None and not looks_secret(name)) or not match.group("value"):
        return match.group(0)
    start, end = match.span("value")
    return match.string[match.start():start] + REDACTED + match.string[end:match.end()]


def redact_text(text: str) -> str:
    """`text` (a URL, a command, an override, a script) with every secret in it replaced by REDACTED."""
    for pattern in _PATTERNS:
        text = pattern.sub(_redact_match, text)
    return text


def redacted_tree(value: Any) -> Any:
    """A copy of a JSON-like tree (a config dump, a launch record) with every string redacted, and the value of
    every key that looks secret replaced."""
    if isinstance(value, dict):
        return {key: REDACTED if isinstance(key, str) and looks_secret(key) and isinstance(item, str) and item
                else redacted_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted_tree(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
