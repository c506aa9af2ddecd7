"""deploy/: the Kubernetes manifests parse, and agree with the CLI and with each other.

No cluster here, so the manifests are checked for what silently rots:

    every document        parses (PyYAML when installed, else the small reader below,
                          which must then agree with PyYAML wherever both exist)
    starmesh ARGS         each flag exists on that command (introspected from the click
                          commands in starmesh.cli.main.COMMANDS), each required option
                          is given (or its environment variable is), each value parses
                          where the CLI has a parser (--store, HOST:PORT listeners)
    $(VAR)                defined in the container's env (Kubernetes leaves an unknown
                          one as literal text)
    Secrets, ConfigMaps   every one referenced is created in its namespace, by a manifest
                          or by `kubectl create` in deploy/README.md, with the keys used
    paths                 files named by flags lie under a mount; a Secret's or
                          ConfigMap's file is one of its items
    ports, names          probes and listeners use declared container ports; Services
                          select pods and target their ports; StatefulSets name headless
                          Services; --store and --control-plane name pods that exist
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from starmesh.cli.main import COMMANDS, main

DEPLOY = Path(__file__).parents[1] / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))

# -- a reader for the YAML the manifests use ----------------------------------------------------
# Block mappings and sequences, plain/quoted scalars, `{}`/`[]`, comments, `---`. Anything
# else is an error here, so a manifest cannot drift into YAML this reader misreads.

_LINE = re.compile(r"^(?P<indent> *)(?P<dash>- +)?(?P<rest>.*)$")
_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_./-]+):(?: +(?P<value>.*))?$")


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        end = text.index('"', 1) if '\\"' not in text else len(text)
        value, rest = json.loads(text[: end + 1]), text[end + 1 :].strip()
    elif text.startswith("'"):
        end = text.index("'", 1)
        value, rest = text[1:end], text[end + 1 :].strip()
    else:
        plain = re.split(r" +#", text, maxsplit=1)[0].strip()
        if any(c in plain[:1] for c in "&*!|>%@`[{") and plain not in ("[]", "{}"):
            raise ValueError(f"unsupported YAML: {text!r}")
        table: dict[str, Any] = {"[]": [], "{}": {}, "true": True, "false": False, "null": None, "~": None, "": None}
        if plain in table:
            return table[plain]
        if re.fullmatch(r"0[0-7]+", plain):
            return int(plain, 8)  # YAML 1.1, as Kubernetes reads `defaultMode: 0400`
        if re.fullmatch(r"-?(0|[1-9][0-9]*)", plain):
            return int(plain)
        return plain
    if rest and not rest.startswith("#"):
        raise ValueError(f"unsupported YAML after a quoted scalar: {text!r}")
    return value


def _lines(text: str) -> list[tuple[int, bool, str]]:
    """(indent, is a sequence item, content) per meaningful line."""
    found = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _LINE.match(raw)
        assert m is not None
        found.append((len(m["indent"]), m["dash"] is not None, m["rest"]))
    return found


def _block(lines: list[tuple[int, bool, str]], at: int, indent: int) -> tuple[Any, int]:
    """The node whose lines start at `at` with this indent; (node, next index)."""
    if lines[at][1]:  # a sequence
        items: list[Any] = []
        while at < len(lines) and lines[at][0] == indent and lines[at][1]:
            _, _, rest = lines[at]
            dash_width = indent + 2  # "- " (the manifests use one space after a dash)
            if _KEY.match(rest):  # a mapping item: its first key sits on the dash line
                lines[at] = (dash_width, False, rest)
                node, at = _block(lines, at, dash_width)
            else:
                node, at = _scalar(rest), at + 1
            items.append(node)
        return items, at
    mapping: dict[str, Any] = {}
    while at < len(lines) and lines[at][0] == indent and not lines[at][1]:
        m = _KEY.match(lines[at][2])
        if m is None:
            raise ValueError(f"unsupported YAML line: {lines[at][2]!r}")
        key, value = m["key"], m["value"]
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        at += 1
        if value is not None and not value.startswith("#"):
            mapping[key] = _scalar(value)
        elif at < len(lines) and (lines[at][0] > indent or (lines[at][0] == indent and lines[at][1])):
            mapping[key], at = _block(lines, at, lines[at][0])
        else:
            mapping[key] = None
    return mapping, at


def read_documents(text: str) -> list[Any]:
    documents = []
    for part in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        lines = _lines(part)
        if not lines:
            continue
        node, end = _block(lines, 0, lines[0][0])
        if end != len(lines):
            raise ValueError(f"unexpected indentation at {lines[end][2]!r}")
        documents.append(node)
    return documents


def load_all(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    ours = read_documents(text)
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return ours
    theirs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert ours == theirs, f"{path.name}: the test's reader and PyYAML disagree"
    return theirs


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    found = []
    for path in MANIFESTS:
        for document in load_all(path):
            assert isinstance(document, dict) and {"apiVersion", "kind", "metadata"} <= set(document), (path, document)
            found.append(document)
    return found


def test_the_reader_reads_what_the_manifests_use() -> None:
    text = 'a: 1\nb:\n  - x\n  - k: "v"\n    n: 0400\nc: {}\n# note\nd: "q" # c\n---\ne: [] # c\n'
    assert read_documents(text) == [{"a": 1, "b": ["x", {"k": "v", "n": 256}], "c": {}, "d": "q"}, {"e": []}]
    for bad in ("a: &x 1\n", "a: [1, 2]\n", "a: |\n  x\n", "a: 1\na: 2\n"):
        with pytest.raises(ValueError, match="unsupported YAML|duplicate key"):
            read_documents(bad)


def test_the_manifests_are_there(objects: list[dict[str, Any]]) -> None:
    assert [p.name for p in MANIFESTS] == ["control-plane.yaml", "etcd.yaml", "sidecar-example.yaml"]
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert ("StatefulSet", "etcd") in kinds and ("StatefulSet", "starmesh-control-plane") in kinds
    assert ("Deployment", "reviews-v1") in kinds
    assert (DEPLOY / "README.md").is_file()


# -- what the manifests hold ------------------------------------------------------------------


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (o for o in objects if o["kind"] in ("Deployment", "StatefulSet"))


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in [*container.get("command", []), *container.get("args", [])]]


def starmesh_calls(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], str, dict[str, list[str]]]]:
    """(workload, container, subcommand, {flag: [values]}) for each `starmesh` container."""
    calls = []
    for workload, container in containers(objects):
        words = argv(container)
        if not words or Path(words[0]).name != "starmesh":
            continue
        command = _command(words[1])
        flags: dict[str, list[str]] = {}
        at = 2
        while at < len(words):
            word = words[at]
            assert word.startswith("--"), f"{container['name']}: {word!r} is not a flag"
            name, eq, value = word.partition("=")
            option = _option(command, name, container["name"])
            if option.is_flag:
                flags.setdefault(name, []).append("")
                at += 1
                continue
            if not eq:
                at += 1
                value = words[at]
            flags.setdefault(name, []).append(value)
            at += 1
        calls.append((workload, container, words[1], flags))
    return calls


def _command(name: str) -> click.Command:
    assert name in COMMANDS, f"starmesh {name}: no such command"
    command = main.get_command(click.Context(main), name)
    assert command is not None
    return command


def _option(command: click.Command, flag: str, where: str) -> click.Option:
    for param in command.params:
        if isinstance(param, click.Option) and flag in (*param.opts, *param.secondary_opts):
            return param
    raise AssertionError(f"{where}: starmesh {command.name} has no option {flag}")


def defined_config(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], set[str]]:
    """(kind, namespace, name) -> keys, for every Secret and ConfigMap a manifest or the
    README's `kubectl -n NS create secret generic|configmap NAME --from-file=KEY=...` makes."""
    made: dict[tuple[str, str, str], set[str]] = {}
    for o in objects:
        if o["kind"] in ("Secret", "ConfigMap"):
            keys = set(o.get("data", {})) | set(o.get("stringData", {}))
            made[(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])] = keys
    for line in (DEPLOY / "README.md").read_text(encoding="utf-8").splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("kubectl ") else []
        if "create" not in words:
            continue
        namespace = words[words.index("-n") + 1]
        rest = words[words.index("create") + 1 :]
        kind, name = ("Secret", rest[2]) if rest[0] == "secret" else ("ConfigMap", rest[1])
        keys = {w.split("=", 2)[1] for w in rest if w.startswith(("--from-file=", "--from-literal="))}
        made[(kind, namespace, name)] = keys
    return made


def test_every_starmesh_flag_exists_and_every_required_one_is_given(objects: list[dict[str, Any]]) -> None:
    calls = starmesh_calls(objects)
    assert sorted(call[2] for call in calls) == ["control-plane", "proxy"]
    for _, container, name, flags in calls:
        command = _command(name)
        env = {e["name"] for e in container.get("env", [])}
        for param in command.params:
            if not isinstance(param, click.Option) or not param.required:
                continue
            given = any(flag in flags for flag in param.opts)
            assert given or (param.envvar and param.envvar in env), f"{container['name']}: starmesh {name} needs {param.opts[0]}"
        for flag, values in flags.items():
            option = _option(command, flag, container["name"])
            assert len(values) == 1 or option.multiple, f"{container['name']}: {flag} given {len(values)} times"


def test_control_plane_and_proxies_agree(objects: list[dict[str, Any]]) -> None:
    from starmesh.reconciler.etcd_client import parse_etcd_url

    calls = {name: (workload, container, flags) for workload, container, name, flags in starmesh_calls(objects)}
    cp_workload, cp_container, cp = calls["control-plane"]
    namespace = cp_workload["metadata"]["namespace"]
    assert cp_workload["kind"] == "StatefulSet"
    store = parse_etcd_url(cp["--store"][0])
    etcd = next(w for w in workloads(objects) if w["metadata"]["name"] == "etcd")
    assert etcd["metadata"]["namespace"] == namespace
    assert [h for h, _ in store.members] == [f"etcd-{i}.{etcd['spec']['serviceName']}" for i in range(etcd["spec"]["replicas"])]
    assert {p for _, p in store.members} == {_port(etcd["spec"]["template"]["spec"]["containers"][0], "client")}
    assert cp["--replica-id"] == ["$(POD_NAME)"]
    listen_port = int(cp["--listen"][0].rsplit(":", 1)[1])
    assert listen_port == _port(cp_container, "https")
    advertised = re.fullmatch(r"https://\$\(POD_NAME\)\.([a-z0-9-]+)\.\$\(POD_NAMESPACE\)\.svc:(\d+)", cp["--advertise-url"][0])
    assert advertised is not None and advertised[1] == cp_workload["spec"]["serviceName"] and int(advertised[2]) == listen_port
    assert "--ca" in cp and "STARMESH_JOIN_TOKEN" in {e["name"] for e in cp_container["env"]}  # HTTPS needs both

    _, proxy_container, proxy = calls["proxy"]
    name = cp_workload["metadata"]["name"]
    expected = [f"https://{name}-{i}.{cp_workload['spec']['serviceName']}.{namespace}.svc:{listen_port}"
                for i in range(cp_workload["spec"]["replicas"])]  # fmt: skip
    assert proxy["--control-plane"] == expected  # every replica, by the name its certificate covers
    assert "--ca-cert" in proxy and "STARMESH_JOIN_TOKEN" in {e["name"] for e in proxy_container["env"]}
    for flag, port_name in (("--inbound", "mesh-inbound"), ("--admin", "mesh-admin")):
        assert int(proxy[flag][0].rsplit(":", 1)[1]) == _port(proxy_container, port_name)
    assert proxy["--inbound"][0].startswith("$(POD_IP):")  # what peers dial: never a wildcard address


def _port(container: dict[str, Any], name: str | int) -> int:
    if isinstance(name, int):
        assert name in [p["containerPort"] for p in container["ports"]], (container["name"], name)
        return name
    found = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(found) == 1, f"{container['name']}: no port named {name!r}"
    return int(found[0])


def test_variables_are_defined_and_probes_use_declared_ports(objects: list[dict[str, Any]]) -> None:
    for _, container in containers(objects):
        env = {e["name"] for e in container.get("env", [])}
        for word in argv(container):
            for variable in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                assert variable in env, f"{container['name']}: $({variable}) is not in its env"
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                action = container[probe].get("httpGet") or container[probe].get("tcpSocket")
                _port(container, action["port"])


def test_secrets_and_config_maps_are_made_with_the_keys_used(objects: list[dict[str, Any]]) -> None:
    made = defined_config(objects)
    used = 0
    for workload, container in containers(objects):
        namespace = workload["metadata"]["namespace"]
        for entry in container.get("env", []):
            source = entry.get("valueFrom", {})
            for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if ref in source:
                    keys = made.get((kind, namespace, source[ref]["name"]))
                    assert keys is not None, f"{kind} {namespace}/{source[ref]['name']} is never made"
                    assert source[ref]["key"] in keys, f"{kind} {source[ref]['name']} has no key {source[ref]['key']}"
                    used += 1
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        volumes |= {t["metadata"]["name"]: {"claim": t} for t in workload["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
        for path in _paths(container):
            mount = max((m for m in mounts if path == m or path.startswith(m + "/")), key=len, default=None)
            assert mount is not None, f"{container['name']}: {path} is not under any volume mount"
            volume = mounts[mount]
            for field, kind, name_field in (("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")):
                if field in volume:
                    keys = made.get((kind, namespace, volume[field][name_field]))
                    assert keys is not None, f"{kind} {namespace}/{volume[field][name_field]} is never made"
                    items = {i["path"]: i["key"] for i in volume[field].get("items", [])} or {k: k for k in keys}
                    assert set(items.values()) <= keys
                    wanted = set(items) if path == mount else {path[len(mount) + 1 :]}
                    assert wanted <= set(items), f"{container['name']}: {path} is not in {kind} {volume[field][name_field]}"
                    used += 1
    assert used >= 6


def _paths(container: dict[str, Any]) -> list[str]:
    """The files and directories starmesh flags name."""
    words = argv(container)
    flags = ("--key", "--ca", "--trust", "--ca-cert", "--state-dir")
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in flags]


def test_services_statefulsets_and_budgets_fit_their_pods(objects: list[dict[str, Any]]) -> None:
    services = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects if o["kind"] == "Service"}
    for workload in workloads(objects):
        namespace = workload["metadata"]["namespace"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if workload["kind"] == "StatefulSet":
            service = services[(namespace, workload["spec"]["serviceName"])]
            assert service["spec"]["clusterIP"] == "None"  # headless: a DNS name per pod
            assert service["spec"]["selector"].items() <= labels.items()
            for port in service["spec"]["ports"]:
                _port(workload["spec"]["template"]["spec"]["containers"][0], port["targetPort"])
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert len(budgets) == 2
    for budget in budgets:
        workload = next(w for w in workloads(objects)
                        if budget["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items())  # fmt: skip
        assert budget["spec"]["minAvailable"] == 2 < workload["spec"]["replicas"] == 3
        anti = workload["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"] == budget["spec"]["selector"]


def test_etcd_bootstraps_its_own_members(objects: list[dict[str, Any]]) -> None:
    etcd = next(w for w in workloads(objects) if w["metadata"]["name"] == "etcd")
    args = dict(a.split("=", 1) for a in argv(etcd["spec"]["template"]["spec"]["containers"][0])[1:])
    members = dict(m.split("=", 1) for m in args["--initial-cluster"].split(","))
    service = etcd["spec"]["serviceName"]
    assert members == {f"etcd-{i}": f"http://etcd-{i}.{service}.$(POD_NAMESPACE).svc:2380" for i in range(etcd["spec"]["replicas"])}
    assert args["--name"] == "$(POD_NAME)" and args["--initial-cluster-state"] == "new"
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in etcd["spec"]["volumeClaimTemplates"]] == ["data"]
