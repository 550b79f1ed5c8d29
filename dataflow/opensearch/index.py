"""Index management for the OpenSearch support indices (and main-index mode).

    python -m dataflow.opensearch.index create [--new] [--alias NAME] [--shards N] [--replicas N]
    python -m dataflow.opensearch.index status
    python -m dataflow.opensearch.index swap INDEX [--alias NAME]

Settings come from the environment (`OPENSEARCH_URL`, `OPENSEARCH_INDEX`,
`OPENSEARCH_AC_INDEX`, `OPENSEARCH_DOCS_INDEX`, ...), as for the pipeline. Each command
prints one JSON object.

The sink owns two indices, each behind an alias: the document support index
(`OPENSEARCH_INDEX`, spec `support`) and the autocomplete index (`OPENSEARCH_AC_INDEX`,
spec `ac`). `create` makes `{alias}-000001` with the mapping and points the alias at it in
one request, for each; run again, it only checks (and adds fields that are missing), so it
is idempotent. `create --new` makes the next index (`-000002`, ...) of one alias (`--alias`:
`support` by default, `ac`, or the alias name) without the alias, for a rebuild: fill it
(run a replay with `OPENSEARCH_INDEX` or `OPENSEARCH_AC_INDEX` set to its name), then `swap`
moves the alias to it atomically (the alias is the one whose `{alias}-NNNNNN` the index is
named after, unless `--alias` says). An existing mapping that conflicts (a feature mapped as
`float`, say) is refused with the field, its type and what to do.

With `OPENSEARCH_DOCS_INDEX` set, `create` also adds the popularity fields to the search
index's mapping (additive; the index itself is never created or replaced here).

The sink calls `IndexAdmin.ensure` (its own indices) and `IndexAdmin.verify` (search index)
before its first write, so a pipeline started on an empty cluster creates what it needs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opensearchpy import NotFoundError, OpenSearch, TransportError

from dataflow.config import Config, OpenSearchSettings, mask_url
from dataflow.errors import ConfigError, IndexMappingError
from dataflow.opensearch.updates import IndexSpec, specs_for

# Zero replicas on a single node (green, not yellow), one copy elsewhere.
DEFAULT_REPLICAS = "0-1"
_GENERATION_RE = re.compile(r"-(\d{6})$")


def client_for(settings: OpenSearchSettings) -> OpenSearch:
    """A client that never retries by itself: the sink decides when to try again. For
    `https://` the server's certificate is verified against `OPENSEARCH_CA_FILE` (else
    opensearch-py's default bundle) and its name checked, unless `OPENSEARCH_VERIFY_CERTS`
    is false (then without a warning per request: `dataflow.run` says it once at start)."""
    kwargs: dict[str, Any] = {
        "hosts": [settings.url.get()],
        "timeout": settings.timeout_seconds,
        "max_retries": 0,
        "retry_on_timeout": False,
    }
    if settings.username:
        kwargs["http_auth"] = (settings.username, settings.password.get())
    if settings.tls:
        kwargs["verify_certs"] = settings.verify_certs
        kwargs["ssl_show_warn"] = False
        if settings.ca_file:
            kwargs["ca_certs"] = settings.ca_file
    return OpenSearch(**kwargs)


def wanted_properties(spec: IndexSpec) -> dict[str, dict[str, Any]]:
    """The mapping of the fields the sink writes for `spec`."""
    props: dict[str, dict[str, Any]] = {}
    if spec.id_field is not None:
        props[spec.id_field] = {"type": "keyword"}
    for name in spec.features:
        props[name] = {"type": "rank_feature"}
    props[spec.time_field] = {"type": "date", "format": "epoch_millis"}
    return props


@dataclass
class MappingCheck:
    missing: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.conflicts


def check_properties(
    existing: Mapping[str, Any], wanted: Mapping[str, Mapping[str, Any]]
) -> MappingCheck:
    """Compare an index's mapped properties with the ones the sink needs."""
    result = MappingCheck()
    for name, want in wanted.items():
        have = existing.get(name)
        if have is None:
            result.missing.append(name)
            continue
        have_type = have.get("type", "object")
        if have_type != want["type"]:
            result.conflicts.append(f"{name} is mapped as {have_type}, needs {want['type']}")
        elif have_type == "rank_feature" and have.get("positive_score_impact", True) is False:
            # Popularity should raise the score; a negative-impact feature inverts ranking.
            result.conflicts.append(f"{name} has positive_score_impact false, needs true")
        elif have_type == "date":
            formats = str(have.get("format", "epoch_millis")).split("||")
            if "epoch_millis" not in formats:
                result.conflicts.append(
                    f"{name} is a date without epoch_millis in its format ({have['format']})"
                )
    return result


@dataclass
class Target:
    """What a name is in the cluster: an alias (over `indices`), an index, or missing."""

    name: str
    kind: str  # "alias", "index" or "missing"
    indices: list[str]


class IndexAdmin:
    def __init__(self, client: OpenSearch) -> None:
        self.client = client

    def resolve(self, name: str) -> Target:
        try:
            # `GET /{name}/_alias/{name}`, not `GET /_alias/{name}`: the latter looks through
            # every index, which a user with rights on its own indices only may not do (the
            # security plugin answers 403); this asks about `name` alone.
            aliases = self.client.indices.get_alias(index=name, name=name)
        except NotFoundError:
            aliases = {}
        if aliases:
            return Target(name, "alias", sorted(aliases))
        if self.client.indices.exists(index=name):
            return Target(name, "index", [name])
        return Target(name, "missing", [])

    def properties(self, index: str) -> dict[str, Any]:
        mapping = self.client.indices.get_mapping(index=index)
        props: dict[str, Any] = mapping[index]["mappings"].get("properties", {})
        return props

    def verify(self, spec: IndexSpec) -> Target:
        """Check that `spec.target` exists with every field mapped as the sink needs."""
        target = self.resolve(spec.target)
        if target.kind == "missing":
            raise IndexMappingError(
                f"{spec.target} does not exist; for the support index run "
                "`python -m dataflow.opensearch.index create`, for OPENSEARCH_DOCS_INDEX "
                "point it at the existing search index"
            )
        wanted = wanted_properties(spec)
        for index in target.indices:
            check = check_properties(self.properties(index), wanted)
            if not check.ok:
                raise IndexMappingError(_problem(spec, index, check))
        return target

    def ensure(
        self, spec: IndexSpec, *, shards: int = 1, replicas: str = DEFAULT_REPLICAS
    ) -> Target:
        """Make `spec.target` usable: create it behind an alias if missing, add missing
        fields, refuse conflicting ones. Safe to run concurrently and repeatedly."""
        target = self.resolve(spec.target)
        if target.kind == "missing" and spec.op == "index":
            first = f"{spec.target}-000001"
            try:
                self.create_index(spec, first, shards=shards, replicas=replicas, alias=True)
            except TransportError as exc:
                # Another partition or process won the race; use what it made.
                if _error_type(exc) != "resource_already_exists_exception":
                    raise
            target = self.resolve(spec.target)
            if target.kind == "missing":  # the alias was removed, its first index was not
                raise IndexMappingError(
                    f"alias {spec.target} is missing but {first} exists; point the alias at "
                    f"it with `python -m dataflow.opensearch.index swap {first}` (or delete it)"
                )
        if target.kind == "missing":
            raise IndexMappingError(
                f"{spec.target} does not exist; point OPENSEARCH_DOCS_INDEX at the existing "
                "search index (the sink never creates it)"
            )
        if target.kind == "alias" and len(target.indices) > 1:
            raise IndexMappingError(
                f"alias {spec.target} points to {len(target.indices)} indices "
                f"({', '.join(target.indices)}), so writes through it fail; keep one with "
                "`python -m dataflow.opensearch.index swap INDEX`"
            )
        wanted = wanted_properties(spec)
        for index in target.indices:
            check = check_properties(self.properties(index), wanted)
            if check.conflicts:
                raise IndexMappingError(_problem(spec, index, check))
            if check.missing:
                # Adding a field to a mapping is allowed and changes nothing that exists.
                self.client.indices.put_mapping(
                    index=index, body={"properties": {n: wanted[n] for n in check.missing}}
                )
        return target

    def create_index(
        self, spec: IndexSpec, name: str, *, shards: int, replicas: str, alias: bool
    ) -> None:
        settings: dict[str, Any] = {"number_of_shards": shards}
        if "-" in replicas:
            settings["auto_expand_replicas"] = replicas
        else:
            settings["number_of_replicas"] = int(replicas)
        body: dict[str, Any] = {
            "settings": {"index": settings},
            # strict: a stray field is a bug in the writer, better refused than mapped.
            "mappings": {"dynamic": "strict", "properties": wanted_properties(spec)},
        }
        if alias:
            body["aliases"] = {spec.target: {}}
        self.client.indices.create(index=name, body=body)

    def create_next(self, spec: IndexSpec, *, shards: int, replicas: str) -> str:
        """Create the next generation `{alias}-NNNNNN` (no alias yet) and return its name."""
        existing = self.client.indices.get(index=f"{spec.target}-*", ignore_unavailable=True)
        generations = [
            int(m.group(1))
            for name in existing
            if name.startswith(f"{spec.target}-") and (m := _GENERATION_RE.search(name))
        ]
        name = f"{spec.target}-{max(generations, default=0) + 1:06d}"
        self.create_index(spec, name, shards=shards, replicas=replicas, alias=False)
        return name

    def swap(self, spec: IndexSpec, index: str) -> list[str]:
        """Point the alias `spec.target` at `index` alone, atomically; returns the indices
        it left (delete them once the new one is trusted)."""
        target = self.resolve(spec.target)
        if target.kind == "index":
            raise IndexMappingError(
                f"{spec.target} is an index, not an alias, so it cannot be swapped; "
                "reindex into a new index and delete it first"
            )
        new = self.resolve(index)
        if new.kind != "index":
            raise IndexMappingError(f"{index} is not an existing index ({new.kind})")
        check = check_properties(self.properties(index), wanted_properties(spec))
        if not check.ok:
            raise IndexMappingError(_problem(spec, index, check))
        old = [name for name in target.indices if name != index]
        actions: list[dict[str, Any]] = [
            {"remove": {"index": name, "alias": spec.target}} for name in old
        ]
        actions.append({"add": {"index": index, "alias": spec.target}})
        self.client.indices.update_aliases(body={"actions": actions})
        return old

    def status(self, spec: IndexSpec) -> dict[str, Any]:
        target = self.resolve(spec.target)
        out: dict[str, Any] = {"spec": spec.name, "name": spec.target, "kind": target.kind}
        if target.kind == "missing":
            return out
        wanted = wanted_properties(spec)
        indices = []
        for index in target.indices:
            check = check_properties(self.properties(index), wanted)
            count = self.client.count(index=index)["count"]
            indices.append(
                {
                    "index": index,
                    "docs": count,
                    "missing": check.missing,
                    "conflicts": check.conflicts,
                }
            )
        out["indices"] = indices
        return out


def _problem(spec: IndexSpec, index: str, check: MappingCheck) -> str:
    parts = [*check.conflicts, *(f"{name} is not mapped" for name in check.missing)]
    if spec.op == "update":
        remedy = "fix the search index mapping (changing a field's type needs a reindex)"
    elif index == spec.target:
        variable = "OPENSEARCH_AC_INDEX" if spec.name == "ac" else "OPENSEARCH_INDEX"
        remedy = (
            f"{index} is a plain index, not the alias the sink manages: delete it (or pick "
            f"another {variable}), then run `create`"
        )
    else:
        remedy = (
            "create a new index with `python -m dataflow.opensearch.index create --new`, "
            "fill it, then `swap` to it"
        )
    return (
        f"index {index} conflicts with the mapping the sink needs for {spec.target}: "
        f"{'; '.join(parts)}. To fix: {remedy}."
    )


def _error_type(exc: TransportError) -> str:
    info = exc.info
    if isinstance(info, dict):
        error = info.get("error")
        if isinstance(error, dict):
            return str(error.get("type", ""))
    return str(exc.error)


# --- the command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataflow.opensearch.index",
        description="Create, inspect and swap the OpenSearch support indices: documents "
        "(OPENSEARCH_INDEX) and autocomplete (OPENSEARCH_AC_INDEX); settings from OPENSEARCH_* "
        "environment variables.",
    )
    alias_help = (
        "which alias: support (OPENSEARCH_INDEX), ac (OPENSEARCH_AC_INDEX) or the alias name"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create the indices behind their aliases (idempotent)")
    create.add_argument("--new", action="store_true", help="create the next index, no alias")
    create.add_argument("--alias", help=f"with --new, {alias_help} (default support)")
    create.add_argument("--shards", type=int, default=1)
    create.add_argument(
        "--replicas", default=DEFAULT_REPLICAS, help="a number, or a range like 0-1 (default)"
    )
    sub.add_parser("status", help="what each alias points to, doc counts, mapping problems")
    swap = sub.add_parser("swap", help="point an alias at INDEX alone, atomically")
    swap.add_argument("index")
    swap.add_argument("--alias", help=f"{alias_help} (default: the one INDEX is named after)")
    return parser


def owned_spec(owned: Sequence[IndexSpec], alias: str | None, index: str | None) -> IndexSpec:
    """The owned spec a `create --new` or `swap` is about: named by `alias` (spec name or
    alias), else the one `index` is a generation of (`{alias}-NNNNNN`), else the support
    index."""
    if alias is not None:
        for spec in owned:
            if alias in (spec.name, spec.target):
                return spec
        names = ", ".join(f"{s.name} ({s.target})" for s in owned)
        raise ConfigError("--alias", f"{alias} is none of the managed aliases: {names}")
    if index is not None:
        for spec in owned:
            if index.startswith(f"{spec.target}-") and _GENERATION_RE.fullmatch(
                index[len(spec.target) :]
            ):
                return spec
    return owned[0]


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Run one command; returns (exit code, the JSON object to print)."""
    args = _parser().parse_args(argv)
    try:
        settings = Config.from_env(env).opensearch
    except ConfigError as exc:
        return 2, {"error": str(exc)}
    if not settings.enabled:
        return 2, {"error": "OPENSEARCH_URL is empty (the sink is disabled); set it"}
    specs = specs_for(settings)
    owned = [spec for spec in specs if spec.op == "index"]
    try:
        # `status` has neither --alias nor INDEX, and concerns every spec anyway.
        chosen = owned_spec(owned, getattr(args, "alias", None), getattr(args, "index", None))
    except ConfigError as exc:
        return 2, {"error": str(exc)}
    admin = IndexAdmin(client_for(settings))
    try:
        if args.command == "create":
            if args.new:
                name = admin.create_next(chosen, shards=args.shards, replicas=args.replicas)
                return 0, {"created": name, "alias": chosen.target, "next": f"swap {name}"}
            out = {}
            for spec in specs:
                if spec.op == "index":
                    target = admin.ensure(spec, shards=args.shards, replicas=args.replicas)
                else:
                    target = admin.ensure(spec)
                out[spec.name] = _describe(target)
            return 0, out
        if args.command == "status":
            return 0, {spec.name: admin.status(spec) for spec in specs}
        old = admin.swap(chosen, args.index)
        return 0, {"alias": chosen.target, "index": args.index, "removed_from": old}
    except IndexMappingError as exc:
        return 1, {"error": str(exc)}
    except TransportError as exc:
        return 1, {"error": f"OpenSearch at {mask_url(settings.url.get())}: {exc}"}
    finally:
        admin.client.close()


def _describe(target: Target) -> dict[str, Any]:
    return {"name": target.name, "kind": target.kind, "indices": target.indices}


def main(argv: Sequence[str] | None = None) -> int:
    code, out = run(sys.argv[1:] if argv is None else argv)
    print(json.dumps(out, indent=2), file=sys.stdout if code == 0 else sys.stderr)  # noqa: T201
    return code


if __name__ == "__main__":
    sys.exit(main())
