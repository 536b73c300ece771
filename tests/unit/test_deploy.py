"""deploy/: the KubeRay manifests are valid for KubeRay and agree with zray itself.

Two kinds of check, offline:

1. Schema: every RayJob and RayCluster (every YAML document of every file under deploy/,
   cpu/ included) validates against the `openAPIV3Schema` of KubeRay's CRD for its kind and
   version (tests/data/kuberay-crds), the way the API server would take it: unknown fields are
   errors (kubectl's default strict field validation), `x-kubernetes-int-or-string` accepts
   both, `x-kubernetes-list-type: map/set` lists have unique keys, int32/int64 formats are
   range-checked, defaulted fields count as given. CEL rules (`x-kubernetes-validations`)
   cannot be evaluated offline; a manifest reaching one fails, naming the rule.
2. Consistency with zray: the entrypoint parses with zray's real command-line parser and names
   the mounted run config; that config parses with `zray.Config`; worker replicas match
   `zray.num_workers` (min/max for the elastic cluster); one GPU per worker iff `use_gpu`; the
   metrics port and PodMonitor agree with `zray.metrics_port`; the checkpoint PVC is mounted
   where `zray.checkpoint_dir` points; every container runs as user 1000 without privileges.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib.metadata
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import zray.cli
from zray.config import Config
from zray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_DIR = ROOT / "tests" / "data" / "kuberay-crds"
# The shared reference data the copies in CRD_DIR came from (absent on a clean CI checkout).
SHARED_CRD_DIR = ROOT.parent / "shared" / "reference" / "kuberay-crds"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")
KUBERAY_KINDS = ("RayCluster", "RayJob")

GPU = "nvidia.com/gpu"
METRICS_PORT_NAME = "zray-metrics"
NON_ROOT_UID = 1000
# Labels KubeRay itself puts on a cluster's head pods (the PodMonitor may select on them).
KUBERAY_HEAD_LABELS = {"ray.io/node-type": "head"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Keys the CPU variant's run config may add to or change in examples/tiny_gpt.json: what a
# cluster needs (checkpoints on the PVC, the metrics endpoint, a run name).
CLUSTER_RUN_KEYS = {
    "run_name",
    "use_gpu",
    "checkpoint_dir",
    "checkpoint_interval",
    "metrics_host",
    "metrics_port",
}

_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---- loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """One YAML document of a file under deploy/."""

    file: Path
    index: int
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind"))

    @property
    def name(self) -> str:
        return str(self.obj.get("metadata", {}).get("name"))

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}#{self.index} {self.kind}/{self.name}"


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def _docs() -> tuple[Doc, ...]:
    docs = []
    for path in _manifest_files():
        for i, obj in enumerate(yaml.load_all(path.read_text(), Loader=_YAML)):
            if obj is None:  # an empty document (a file of comments, such as the example)
                continue
            assert isinstance(obj, dict), f"{path}#{i}: a YAML mapping, got {type(obj).__name__}"
            docs.append(Doc(path, i, obj))
    return tuple(docs)


def _of_kind(*kinds: str) -> list[Doc]:
    return [d for d in _docs() if d.kind in kinds]


def _same_file(doc: Doc, kind: str) -> list[Doc]:
    return [d for d in _docs() if d.file == doc.file and d.kind == kind]


def _ids(docs: list[Doc]) -> list[str]:
    return [str(d) for d in docs]


# ---- the CRD schemas, as the API server applies them ---------------------------------------


@functools.cache
def _crds() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema of every served version of the CRDs."""
    out = {}
    for name in CRD_FILES:
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=_YAML)
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served", False):
                key = (spec["group"], version["name"], spec["names"]["kind"])
                out[key] = version["schema"]["openAPIV3Schema"]
    return out


def _strict(schema: Any) -> Any:
    """A copy in which an object schema with `properties` admits no other keys.

    The API server prunes unknown fields of structural schemas, and `kubectl apply` (strict
    field validation by default) refuses them; JSON Schema would let them pass silently, so a
    misspelt field (`minReplica`) would go unnoticed.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k != "enum" and k != "default" else v for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        out["additionalProperties"] = False
    return out


def _type(validator: Any, types: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if instance is None and schema.get("nullable"):
        return
    if schema.get("x-kubernetes-int-or-string") and _int_or_string(instance):
        return
    names = [types] if isinstance(types, str) else list(types)
    if not any(validator.is_type(instance, t) for t in names):
        yield jsonschema.ValidationError(f"{instance!r} is not of type {', '.join(names)}")


def _int_or_string(instance: Any) -> bool:
    return isinstance(instance, int | str) and not isinstance(instance, bool)


def _int_or_string_keyword(
    validator: Any, value: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[Any]:
    if value and not _int_or_string(instance):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _required(
    validator: Any, required: list[str], instance: Any, schema: dict[str, Any]
) -> Iterator[Any]:
    # The API server applies defaults before it validates: a defaulted field counts as given.
    if not validator.is_type(instance, "object"):
        return
    props = schema.get("properties", {})
    for name in required:
        if name not in instance and "default" not in props.get(name, {}):
            yield jsonschema.ValidationError(f"{name!r} is a required property")


def _list_type(validator: Any, kind: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if not validator.is_type(instance, "array"):
        return
    if kind == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list-type set")
            seen.append(item)
    elif kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        seen_keys: set[tuple[Any, ...]] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
            if key in seen_keys:
                named = dict(zip(keys, key, strict=True))
                yield jsonschema.ValidationError(f"duplicate entry {named} in a list-type map")
            seen_keys.add(key)


def _cel(validator: Any, rules: list[Any], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    listed = "; ".join(str(r.get("rule")) for r in rules)
    yield jsonschema.ValidationError(
        f"this field carries CEL rules that cannot be checked offline ({listed}); check them "
        "by hand and add a test for them in tests/unit/test_deploy.py"
    )


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {
        "type": _type,
        "required": _required,
        "x-kubernetes-int-or-string": _int_or_string_keyword,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel,
    },
)

_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def _schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every way `obj` fails its CRD schema, as 'path: message' lines ([] when valid)."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    key = (group, version, obj.get("kind"))
    if key not in _crds():
        known = ", ".join(f"{g}/{v} {k}" for g, v, k in sorted(_crds()))
        return [f"no served CRD version for {obj.get('apiVersion')} {obj.get('kind')}: {known}"]
    validator = _K8sValidator(_strict(_crds()[key]), format_checker=_FORMATS)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{e.json_path}: {e.message}" for e in errors] + _metadata_errors(obj)


_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def _metadata_errors(obj: dict[str, Any]) -> list[str]:
    # The CRD schemas leave metadata to the API server's own ObjectMeta checks; the basics here.
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    errors = []
    if not (isinstance(name, str) and len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name)):
        errors.append(f"$.metadata.name: {name!r} is not a DNS-1123 subdomain")
    for field in ("labels", "annotations"):
        for k, v in (meta.get(field) or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                errors.append(f"$.metadata.{field}: {k!r}: {v!r} must be a string to a string")
    return errors


KUBERAY_DOCS = _of_kind(*KUBERAY_KINDS)


def test_the_crd_copies_match_the_shared_reference() -> None:
    if not SHARED_CRD_DIR.is_dir():
        pytest.skip(f"{SHARED_CRD_DIR} is not here (a clean checkout): nothing to compare with")
    for name in CRD_FILES:
        ours = hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest()
        theirs = hashlib.sha256((SHARED_CRD_DIR / name).read_bytes()).hexdigest()
        assert ours == theirs, f"tests/data/kuberay-crds/{name} differs from {SHARED_CRD_DIR}"


def test_deploy_has_the_manifests_the_docs_promise() -> None:
    kinds = {(d.file.relative_to(DEPLOY).as_posix(), d.kind) for d in _docs()}
    for expected in [
        ("rayjob.yaml", "RayJob"),
        ("raycluster-autoscaling.yaml", "RayCluster"),
        ("pvc.yaml", "PersistentVolumeClaim"),
        ("podmonitor.yaml", "PodMonitor"),
        ("cpu/rayjob.yaml", "RayJob"),
        ("networkpolicy.yaml", "NetworkPolicy"),
    ]:
        assert expected in kinds, f"{expected[1]} missing from deploy/{expected[0]}"
    assert (DEPLOY / "Dockerfile").is_file()


@pytest.mark.parametrize("doc", list(_docs()), ids=_ids(list(_docs())))
def test_every_object_names_its_kind_and_has_a_valid_name(doc: Doc) -> None:
    assert doc.obj.get("apiVersion") and doc.obj.get("kind"), f"{doc}: apiVersion and kind"
    errors = _metadata_errors(doc.obj)
    assert not errors, f"{doc}: " + "; ".join(errors)


@pytest.mark.parametrize("doc", KUBERAY_DOCS, ids=_ids(KUBERAY_DOCS))
def test_manifest_validates_against_the_kuberay_crd(doc: Doc) -> None:
    assert doc.obj["apiVersion"] == "ray.io/v1", f"{doc}: use ray.io/v1 (v1alpha1 is deprecated)"
    errors = _schema_errors(doc.obj)
    assert not errors, f"{doc} does not validate against its CRD:\n" + "\n".join(errors)


def test_the_schema_check_rejects_what_the_api_server_rejects() -> None:
    """The validator is not vacuous: each of these breaks one rule the API server enforces."""
    base = next(d for d in KUBERAY_DOCS if d.kind == "RayJob").obj
    assert _schema_errors(base) == []

    def broken(edit: Any) -> list[str]:
        obj = copy.deepcopy(base)
        edit(obj)
        return _schema_errors(obj)

    cluster = ("spec", "rayClusterSpec")

    def at(obj: dict[str, Any], *path: str | int) -> Any:
        for p in path:
            obj = obj[p]
        return obj

    def head_container(obj: dict[str, Any]) -> dict[str, Any]:
        return at(obj, *cluster, "headGroupSpec", "template", "spec", "containers", 0)

    cases = {
        "unknown field": lambda o: at(o, *cluster, "workerGroupSpecs", 0).update(minReplica=1),
        "wrong type": lambda o: at(o, *cluster, "workerGroupSpecs", 0).update(replicas="four"),
        "int32 out of range": lambda o: at(o, *cluster, "workerGroupSpecs", 0).update(
            maxReplicas=2**40
        ),
        "missing required": lambda o: head_container(o).pop("name"),
        "duplicate list-map key": lambda o: head_container(o)["ports"].append(
            {"containerPort": 9464, "name": "again"}
        ),
        "bad quantity": lambda o: head_container(o)["resources"]["limits"].update(cpu=[4]),
        "bad enum": lambda o: at(o, "spec", "rayClusterSpec", "authOptions").update(mode="magic"),
        "CEL rule reached": lambda o: o["spec"].update(managedBy="someone"),
        "bad name": lambda o: o["metadata"].update(name="Not_A_Name"),
    }
    for what, edit in cases.items():
        assert broken(edit), f"the schema check accepted a manifest with a {what}"
    # int-or-string accepts both forms.
    for cpu in (4, "4", "500m"):
        assert not broken(lambda o, c=cpu: head_container(o)["resources"]["limits"].update(cpu=c))


# ---- walking the manifests -----------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A RayCluster spec: a RayCluster's own, or the one a RayJob creates."""

    doc: Doc
    spec: dict[str, Any]

    @property
    def head_pod(self) -> dict[str, Any]:
        return self.spec["headGroupSpec"]["template"]["spec"]

    @property
    def head_labels(self) -> dict[str, str]:
        labels = self.spec["headGroupSpec"]["template"].get("metadata", {}).get("labels", {})
        return {**labels, **KUBERAY_HEAD_LABELS}

    @property
    def head(self) -> dict[str, Any]:
        return self.head_pod["containers"][0]  # KubeRay: the Ray container comes first

    @property
    def groups(self) -> list[dict[str, Any]]:
        return self.spec.get("workerGroupSpecs", [])

    def pods(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, pod spec) of the head, each worker group, and a RayJob's submitter."""
        out = [("head", self.head_pod)]
        out += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in self.groups]
        submitter = self.doc.obj["spec"].get("submitterPodTemplate")
        if self.doc.kind == "RayJob" and submitter:
            out.append(("submitter", submitter["spec"]))
        return out

    def ray_containers(self) -> list[tuple[str, dict[str, Any]]]:
        """The Ray container of the head and of every worker group."""
        out = [("head", self.head)]
        out += [
            (f"worker group {g['groupName']}", g["template"]["spec"]["containers"][0])
            for g in self.groups
        ]
        return out


CLUSTERS = [
    Cluster(d, d.obj["spec"]["rayClusterSpec"] if d.kind == "RayJob" else d.obj["spec"])
    for d in KUBERAY_DOCS
]
CLUSTER_IDS = [str(c.doc) for c in CLUSTERS]


def _configmap_files(cluster: Cluster, container: dict[str, Any]) -> dict[str, tuple[Doc, str]]:
    """Path in `container` -> (ConfigMap doc, key) for every ConfigMap file mounted in it.

    Only ConfigMaps defined in the same file as the cluster: a manifest must carry its run."""
    volumes = {v["name"]: v for v in _pod_of(cluster, container).get("volumes", [])}
    maps = {d.name: d for d in _same_file(cluster.doc, "ConfigMap")}
    out = {}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("configMap")
        if not source or source["name"] not in maps:
            continue
        doc = maps[source["name"]]
        items = {i["key"]: i["path"] for i in source.get("items", [])}
        keys = list(items) if items else list(doc.obj.get("data", {}))
        for key in keys:
            if "subPath" in mount:
                if mount["subPath"] == items.get(key, key):
                    out[mount["mountPath"]] = (doc, key)
            else:
                out[f"{mount['mountPath'].rstrip('/')}/{items.get(key, key)}"] = (doc, key)
    return out


def _pod_of(cluster: Cluster, container: dict[str, Any]) -> dict[str, Any]:
    for _, pod in cluster.pods():
        if any(c is container for c in pod.get("containers", [])):
            return pod
    raise AssertionError(f"{cluster.doc}: container {container.get('name')} is in no pod")


def _parse_entrypoint(entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """`entrypoint` parsed by zray's own parser (`zray.cli.main`), stopped before it trains."""
    words = shlex.split(entrypoint)
    assert words[:1] == ["zray"], f"entrypoint {entrypoint!r}: the command must be `zray`"
    scripts = importlib.metadata.entry_points(group="console_scripts", name="zray")
    assert [ep.value for ep in scripts] == ["zray.cli:main"], "the `zray` script is zray.cli:main"
    seen: list[argparse.Namespace] = []

    def capture(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(zray.cli, "_cmd_fit", capture)  # the parser dispatches here for `fit`
    try:
        rc = zray.cli.main(words[1:])
    except SystemExit as e:  # argparse: unknown subcommand or option
        raise AssertionError(f"entrypoint {entrypoint!r}: zray's parser refused it ({e})") from e
    assert rc == 0 and seen, f"entrypoint {entrypoint!r}: not a `zray fit` command"
    return seen[0]


@functools.cache
def _elastic_ranges_parse() -> bool:
    """Whether zray.Config takes `"num_workers": [min, max]` yet (the elastic issue adds it)."""
    try:
        Config.from_dict({"zray": {"num_workers": [1, 2]}})
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class Run:
    """The run config a cluster trains: where it is mounted, its raw dict, the parsed Config."""

    path: str
    raw: dict[str, Any]
    config: Config
    workers: tuple[int, int]  # (min, max); equal for a fixed size


def _run(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Run:
    files = _configmap_files(cluster, cluster.head)
    workers_flag = None
    if cluster.doc.kind == "RayJob":
        args = _parse_entrypoint(cluster.doc.obj["spec"]["entrypoint"], monkeypatch)
        path, workers_flag = args.config, args.workers
        assert path in files, (
            f"{cluster.doc}: the entrypoint's config {path!r} is not a ConfigMap file mounted in "
            f"the head container (mounted: {sorted(files)})"
        )
    else:  # a standing cluster: its run config is the one ConfigMap file on the head
        assert len(files) == 1, f"{cluster.doc}: one run config ConfigMap on the head: {files}"
        path = next(iter(files))
    doc, key = files[path]
    text = doc.obj["data"][key]
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict) and isinstance(raw.get("zray"), dict), (
        f"{doc} {key}: a run config with a 'zray' section"
    )
    n = raw["zray"].get("num_workers", 1)
    workers = (n[0], n[1]) if isinstance(n, list) else (n, n)
    if workers_flag is not None:
        workers = (workers_flag, workers_flag)
    # Parse it the way `zray fit` does: Config.load on a file with the mounted name.
    parsed_text = text
    if isinstance(n, list) and not _elastic_ranges_parse():
        # Until RunConfig takes [min, max], check everything else with num_workers = min.
        parsed_text = yaml.safe_dump({**raw, "zray": {**raw["zray"], "num_workers": n[0]}})
    local = tmp_path / Path(path).name
    local.write_text(parsed_text)
    try:
        config = Config.load(str(local))
    except ConfigError as e:
        raise AssertionError(f"{doc} {key}: zray refuses the run config: {e}") from e
    return Run(path, raw, config, workers)


# ---- consistency with zray -----------------------------------------------------------------


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_run_config_parses_and_batches_at_every_world_size(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = _run(cluster, monkeypatch, tmp_path)
    lo, hi = run.workers
    assert 1 <= lo <= hi, f"{cluster.doc}: num_workers {run.workers}"
    for world in range(lo, hi + 1):  # the elastic controller may pick any size in between
        try:
            run.config.resolve_batch(world)
        except ConfigError as e:
            raise AssertionError(f"{cluster.doc}: no valid batch at {world} workers: {e}") from e
    assert run.config.zray.model, f"{cluster.doc}: the run config names no zray.model"
    assert run.config.zray.data is not None, f"{cluster.doc}: the run config names no zray.data"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_worker_replicas_match_num_workers(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lo, hi = _run(cluster, monkeypatch, tmp_path).workers
    assert len(cluster.groups) == 1, f"{cluster.doc}: one worker group (one worker per pod)"
    group = cluster.groups[0]
    replicas = group.get("replicas", 1)
    bounds = (group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1))
    if lo == hi:
        assert replicas == lo, f"{cluster.doc}: replicas {replicas} != zray.num_workers {lo}"
        assert bounds == (lo, lo), (
            f"{cluster.doc}: minReplicas/maxReplicas {bounds} != zray.num_workers {lo}"
        )
    else:
        assert cluster.spec.get("enableInTreeAutoscaling") is True, (
            f"{cluster.doc}: elastic num_workers {[lo, hi]} needs enableInTreeAutoscaling"
        )
        assert bounds == (lo, hi), (
            f"{cluster.doc}: minReplicas/maxReplicas {bounds} != zray's elastic "
            f"num_workers {[lo, hi]}"
        )
        assert lo <= replicas <= hi, f"{cluster.doc}: replicas {replicas} outside {[lo, hi]}"


def _quantity(q: int | float | str) -> float:
    """A Kubernetes quantity ("500m", "16Gi", "4", 1) as a number."""
    if isinstance(q, int | float):
        return float(q)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20}
    units |= {"Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", q)
    assert m and m.group(2) in ("", *units), f"not a quantity: {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def _ray_cpus(group: dict[str, Any]) -> float:
    container = group["template"]["spec"]["containers"][0]
    given = group.get("rayStartParams", {}).get("num-cpus")
    return float(given) if given is not None else _quantity(container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_gpus_per_worker_follow_use_gpu(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_gpu = _run(cluster, monkeypatch, tmp_path).config.zray.use_gpu
    for group in cluster.groups:
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        gpus = _quantity(res.get("limits", {}).get(GPU, 0))
        assert gpus == (1 if use_gpu else 0), (
            f"{cluster.doc} group {group['groupName']}: {gpus:g} GPUs per worker with "
            f"zray.use_gpu {use_gpu} (zray runs one worker per GPU)"
        )
        assert _quantity(res.get("requests", {}).get(GPU, gpus)) == gpus
        tolerates = any(t.get("key") == GPU for t in pod.get("tolerations", []))
        assert tolerates == use_gpu, (
            f"{cluster.doc} group {group['groupName']}: a {GPU} toleration only with GPUs"
        )
        # zray places one {"CPU": 1(, "GPU": 1)} bundle per worker.
        assert _ray_cpus(group) >= 1, f"{cluster.doc}: workers need at least 1 Ray CPU"
    head_gpus = cluster.head.get("resources", {}).get("limits", {}).get(GPU, 0)
    assert _quantity(head_gpus) == 0, f"{cluster.doc}: the head trains nothing; no GPU there"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_metrics_port_on_the_head_matches_the_run_config_and_the_podmonitor(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = _run(cluster, monkeypatch, tmp_path).config.zray
    assert run.metrics_port, f"{cluster.doc}: zray.metrics_port is off; Prometheus has no target"
    assert run.metrics_host not in LOOPBACK, (
        f"{cluster.doc}: zray.metrics_host {run.metrics_host!r} is loopback; Prometheus cannot "
        'scrape the pod (use "0.0.0.0")'
    )
    assert run.run_name, f"{cluster.doc}: set zray.run_name (the dashboards' run variable)"
    ports = {p.get("name"): p for p in cluster.head.get("ports", [])}
    assert METRICS_PORT_NAME in ports, f"{cluster.doc}: no {METRICS_PORT_NAME!r} port on the head"
    assert ports[METRICS_PORT_NAME]["containerPort"] == run.metrics_port, (
        f"{cluster.doc}: head port {METRICS_PORT_NAME} is "
        f"{ports[METRICS_PORT_NAME]['containerPort']}, zray.metrics_port is {run.metrics_port}"
    )
    for name in ports:  # IANA_SVC_NAME, what the API server checks of a port name
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", name), f"port name {name!r}"

    monitors = _of_kind("PodMonitor")
    assert monitors, "deploy/ has no PodMonitor"
    for monitor in monitors:
        assert monitor.obj["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor.obj["spec"]["selector"]["matchLabels"]
        head = cluster.head_labels
        assert all(head.get(k) == v for k, v in selector.items()), (
            f"{monitor} selector {selector} does not select the head pod of {cluster.doc} "
            f"(labels {head})"
        )
        for group in cluster.groups:
            labels = group["template"].get("metadata", {}).get("labels", {})
            labels = {**labels, "ray.io/node-type": "worker"}
            assert not all(labels.get(k) == v for k, v in selector.items()), (
                f"{monitor} also selects worker pods, which serve no metrics"
            )
        endpoints = monitor.obj["spec"]["podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == [METRICS_PORT_NAME], endpoints


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_checkpoint_pvc_is_mounted_where_checkpoint_dir_points(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ckpt = _run(cluster, monkeypatch, tmp_path).config.zray.checkpoint_dir
    assert ckpt, f"{cluster.doc}: no zray.checkpoint_dir: a restart would start from step 0"
    claims = {d.name: d for d in _of_kind("PersistentVolumeClaim")}
    for where, container in cluster.ray_containers():
        pod = _pod_of(cluster, container)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        found = []
        for mount in container.get("volumeMounts", []):
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            root = mount["mountPath"].rstrip("/")
            if claim and (ckpt == root or ckpt.startswith(root + "/")):
                found.append((claim, mount))
        assert found, (
            f"{cluster.doc} {where}: no PVC mounted at or above zray.checkpoint_dir {ckpt!r} "
            "(every rank writes its shard there)"
        )
        claim, mount = found[0]
        assert claim in claims, f"{cluster.doc}: PVC {claim!r} is defined nowhere in deploy/"
        assert not mount.get("readOnly"), (
            f"{cluster.doc} {where}: the checkpoint mount is read-only"
        )
        assert "subPath" not in mount, "subPath dirs are created as root, unwritable by user 1000"
        modes = claims[claim].obj["spec"]["accessModes"]
        single_node = cluster.doc.file.parent.name == "cpu"  # the laptop variant
        assert single_node or "ReadWriteMany" in modes, (
            f"{cluster.doc}: PVC {claim} is {modes}; pods on several nodes share it: ReadWriteMany"
        )


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_ray_version_is_the_one_zray_pins(cluster: Cluster) -> None:
    # pyproject.toml, not installed metadata (an editable install's can be stale).
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [cluster.spec["rayVersion"]], (
        f"{cluster.doc}: rayVersion {cluster.spec['rayVersion']} but pyproject.toml pins ray {pins}"
    )
    images = {c["image"] for _, pod in cluster.pods() for c in pod["containers"]}
    assert len(images) == 1, f"{cluster.doc}: one image for head, workers and submitter: {images}"


def test_cpu_variant_runs_the_tiny_gpt_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (cluster,) = [c for c in CLUSTERS if c.doc.file.parent.name == "cpu"]
    raw = _run(cluster, monkeypatch, tmp_path).raw
    demo = yaml.safe_load((ROOT / "examples" / "tiny_gpt.json").read_text())
    assert {k: v for k, v in raw.items() if k != "zray"} == {
        k: v for k, v in demo.items() if k != "zray"
    }, "deploy/cpu's run config drifted from examples/tiny_gpt.json"
    changed = {
        k
        for k in raw["zray"].keys() | demo["zray"].keys()
        if raw["zray"].get(k) != demo["zray"].get(k)
    }
    assert changed <= CLUSTER_RUN_KEYS, (
        f"deploy/cpu changes {changed - CLUSTER_RUN_KEYS} of the demo"
    )
    assert len(cluster.groups) == 1 and cluster.groups[0]["replicas"] == 2
    assert cluster.doc.obj["spec"]["entrypoint"].startswith("zray fit ")


# ---- security ------------------------------------------------------------------------------


def _container_contexts(cluster: Cluster) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, its pod spec) for every container, the KubeRay autoscaler's too."""
    for where, pod in cluster.pods():
        for field in ("initContainers", "containers"):
            for c in pod.get(field, []):
                yield f"{where} {field[:-1]} {c.get('name')}", c, pod
    options = cluster.spec.get("autoscalerOptions")
    if cluster.spec.get("enableInTreeAutoscaling"):
        assert options, f"{cluster.doc}: the autoscaler sidecar needs autoscalerOptions"
        yield "autoscaler sidecar", {"name": "autoscaler", **options}, cluster.head_pod


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_pods_are_not_privileged(cluster: Cluster) -> None:
    for where, pod in cluster.pods():
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(field), f"{cluster.doc} {where}: {field}"
        assert not any("hostPath" in v for v in pod.get("volumes", [])), f"{where}: hostPath"
        ctx = pod.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True, f"{cluster.doc} {where}: pod runAsNonRoot"
        assert ctx.get("runAsUser") == NON_ROOT_UID, f"{cluster.doc} {where}: pod runAsUser"
        assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_only_the_autoscaler_gets_a_kubernetes_api_token(cluster: Cluster) -> None:
    # Ray needs no Kubernetes API access, except the autoscaler sidecar on the head, which
    # scales the worker pods with the head pod's service account token.
    autoscaling = bool(cluster.spec.get("enableInTreeAutoscaling"))
    for where, pod in cluster.pods():
        mounted = pod.get("automountServiceAccountToken", True)
        wanted = autoscaling and where == "head"
        assert mounted == wanted, (
            f"{cluster.doc} {where}: automountServiceAccountToken should be {wanted}"
            + (" (the autoscaler calls the Kubernetes API)" if wanted else "")
        )


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_containers_run_as_user_1000_without_privileges(cluster: Cluster) -> None:
    for where, c, pod in _container_contexts(cluster):
        ctx, pod_ctx = c.get("securityContext", {}), pod.get("securityContext", {})
        at = f"{cluster.doc} {where}"
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{at}: runAsNonRoot"
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) == NON_ROOT_UID, f"{at}: runAsUser"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
        assert not ctx.get("privileged"), f"{at}: privileged"
        caps = ctx.get("capabilities", {})
        assert "ALL" in caps.get("drop", []), f"{at}: capabilities.drop must include ALL"
        assert not caps.get("add"), f"{at}: adds capabilities {caps.get('add')}"
        assert ctx.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem"
        # A read-only root needs a writable /tmp (Ray's sessions and logs): an emptyDir.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{at}: read-only root filesystem without a /tmp mount"
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{at}: /tmp is not an emptyDir"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{at}: mounts undeclared volume {m['name']!r}"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_containers_have_requests_and_limits(cluster: Cluster) -> None:
    for where, c, pod in _container_contexts(cluster):
        res, at = c.get("resources", {}), f"{cluster.doc} {where}"
        for kind in ("cpu", "memory"):
            assert kind in res.get("requests", {}), f"{at}: no {kind} request"
            assert kind in res.get("limits", {}), f"{at}: no {kind} limit"
            assert _quantity(res["requests"][kind]) <= _quantity(res["limits"][kind]), at
        # A memory-backed emptyDir counts against the container's memory limit.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            empty = volumes[m["name"]].get("emptyDir") or {}
            if empty.get("medium") == "Memory":
                assert "sizeLimit" in empty, f"{at}: memory-backed {m['name']} has no sizeLimit"
                limit = _quantity(res["limits"]["memory"])
                assert _quantity(empty["sizeLimit"]) < limit, f"{at}: {m['name']} > memory limit"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_ray_pods_have_a_memory_backed_dev_shm(cluster: Cluster) -> None:
    for where, container in cluster.ray_containers():
        volumes = {v["name"]: v for v in _pod_of(cluster, container).get("volumes", [])}
        shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{cluster.doc} {where}: no /dev/shm mount (Ray's object store, NCCL)"
        medium = volumes[shm[0]["name"]].get("emptyDir", {}).get("medium")
        assert medium == "Memory", f"{cluster.doc} {where}: /dev/shm is not memory-backed"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=CLUSTER_IDS)
def test_ray_token_comes_from_the_secret(cluster: Cluster) -> None:
    auth = cluster.spec.get("authOptions", {})
    assert auth.get("mode") == "token", f"{cluster.doc}: authOptions.mode token"
    secret = auth.get("secretName")
    assert secret, f"{cluster.doc}: authOptions.secretName (KubeRay's own client needs the token)"
    for where, c, _ in _container_contexts(cluster):
        env = {e["name"]: e for e in c.get("env", [])}
        at = f"{cluster.doc} {where}"
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{at}: RAY_AUTH_MODE=token"
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{at}: RAY_AUTH_TOKEN written in the manifest"
        ref = token.get("valueFrom", {}).get("secretKeyRef", {})
        assert ref == {"name": secret, "key": "auth_token"}, f"{at}: RAY_AUTH_TOKEN from {ref}"


def test_no_secret_values_are_committed() -> None:
    assert not _of_kind("Secret"), "deploy/ must not hold Secret objects (a known token)"
    example = (DEPLOY / "secret.example.yaml").read_text()
    assert "kubectl create secret generic" in example and "auth_token" in example


def test_dockerfile_builds_the_extension_and_runs_as_user_1000() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    stages = [i for i, ln in enumerate(instructions) if ln.upper().startswith("FROM ")]
    final = instructions[stages[-1] :]
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(NON_ROOT_UID), f"final USER {users}"
    assert re.search(r"BASE_IMAGE=\S*cuda", text), "the default base image is a CUDA PyTorch"
    # The extension is compiled while the image builds, and checked there.
    assert re.search(r"pip (wheel|install)[^\n]* \.", text), "zray is built from the repo"
    assert "kernel_report" in text, "the image build checks that zray._C built"
    assert "wget" in text, "KubeRay's probes need wget in the image"
    for ln in instructions:  # COPY sources exist, relative to the repo root (the context)
        if ln.upper().startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"


# ---- the NetworkPolicy: zray's pods reach each other; from outside, only named ports --------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_network_policy_covers_every_zray_pod_and_admits_them_to_each_other() -> None:
    (policy,) = _of_kind("NetworkPolicy")
    spec = policy.obj["spec"]
    assert policy.obj["apiVersion"] == "networking.k8s.io/v1"
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]["matchLabels"]
    peers = [r for r in spec["ingress"] if "ports" not in r]
    assert len(peers) == 1, "one rule without ports: zray's pods among themselves"
    (peer,) = peers[0]["from"]
    assert set(peer) == {"podSelector"}, "pods of this namespace only, no namespaceSelector"
    assert peer["podSelector"]["matchLabels"] == selector
    for cluster in CLUSTERS:
        labelled = [("head", cluster.head_labels)]
        labelled += [
            (g["groupName"], g["template"].get("metadata", {}).get("labels", {}))
            for g in cluster.groups
        ]
        submitter = cluster.doc.obj["spec"].get("submitterPodTemplate")
        if cluster.doc.kind == "RayJob" and submitter:
            labelled.append(("submitter", submitter.get("metadata", {}).get("labels", {})))
        for where, labels in labelled:
            assert _selects(selector, labels), f"{cluster.doc} {where}: not covered ({labels})"


def test_the_network_policy_opens_only_the_operator_and_metrics_ports_from_outside() -> None:
    (policy,) = _of_kind("NetworkPolicy")
    outside = [r for r in policy.obj["spec"]["ingress"] if "ports" in r]
    opened = {p["port"] for r in outside for p in r["ports"]}
    assert opened == {8265, METRICS_PORT_NAME}, opened
    for rule in outside:
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"} and peer["namespaceSelector"]["matchLabels"]
    for cluster in CLUSTERS:  # the ports named are the head's
        ports = {p.get("name"): p["containerPort"] for p in cluster.head.get("ports", [])}
        assert ports.get("dashboard") == 8265 and METRICS_PORT_NAME in ports, cluster.doc
