"""examples/kubernetes: an indexed Job of workers and the PostgreSQL they share, checked offline
(not run): every manifest against Kubernetes' own schema (kubernetes-validate ships it, strict:
an unknown or misspelt field fails), and the parts that must agree with lorasweep and with each
other: the study file the Job mounts loads, its command parses, its storage URL names the
database's Service. And what the Job does first, every pod opening a fresh database at once,
is run against a real PostgreSQL (skipped where it is not installed)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from lorasweep.cli import build_parser
from lorasweep.config import load_study
from lorasweep.study.store import Store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kubernetes"
KUBERNETES = "1.37.0"  # the newest schema kubernetes-validate ships (requirements-dev.txt)


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLE / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in documents(name)}


@pytest.mark.parametrize("name", ["postgres.yaml", "workers.yaml"])
def test_every_manifest_is_valid_kubernetes(name: str):
    for document in documents(name):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_schema_check_refuses_a_misspelt_field():
    job = copy.deepcopy(by_kind("workers.yaml")["Job"])
    job["spec"]["completionMod"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES, strict=True)


def test_the_workers_run_the_mounted_study_on_the_database(tmp_path: Path):
    workers, database = by_kind("workers.yaml"), by_kind("postgres.yaml")
    job = workers["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    pod = job["template"]["spec"]
    [container] = pod["containers"]
    # the study file the ConfigMap holds loads, at the path the command reads it from
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "study"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "study"]
    assert volume["configMap"]["name"] == workers["ConfigMap"]["metadata"]["name"]
    (tmp_path / "study.yaml").write_text(workers["ConfigMap"]["data"]["study.yaml"])
    load_study(tmp_path / "study.yaml")
    command = container["command"]
    assert command[0] == "lorasweep" and command[2] == f"{mount['mountPath']}/study.yaml"
    build_parser().parse_args(command[1:])
    # the storage is the database's Service, its user and database, its password the Secret's
    env = {e["name"]: e for e in container["env"]}
    url = make_url(env["LORASWEEP_STORAGE"]["value"])
    service, statefulset = database["Service"], database["StatefulSet"]
    assert url.host == service["metadata"]["name"] and url.password is None
    assert url.port == service["spec"]["ports"][0]["port"]
    db_env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert url.username == db_env["POSTGRES_USER"]["value"]
    assert url.database == db_env["POSTGRES_DB"]["value"]
    secret = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret == db_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == database["Secret"]["metadata"]["name"]


def test_pods_that_start_at_once_all_join_a_fresh_database(postgres, tmp_path: Path):
    """Every pod runs `lorasweep run` at the same moment on an empty database: they race to
    create Optuna's tables and the study (PostgreSQL fails the losers on a duplicate key), and
    each must come out with the one study."""
    url = postgres.new_database()
    start, errors, ids = threading.Barrier(6), [], []

    def pod(number: int) -> None:
        start.wait()
        try:
            ids.append(Store(tmp_path / str(number), "race", maximize=True, storage_url=url,
                             patience=30).study_id)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    pods = [threading.Thread(target=pod, args=(n,)) for n in range(6)]
    for thread in pods:
        thread.start()
    for thread in pods:
        thread.join()
    assert not errors, errors
    assert len(ids) == 6 and len(set(ids)) == 1
