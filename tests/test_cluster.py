"""Placement by resources on a real multi-node Ray: ``ray.cluster_utils.Cluster`` on this machine.

The cluster has a head (the driver, and the replay with it), a learner node carrying the custom
resource ``learner`` and a rollout node carrying ``rollout``; with ``online.learner_resource:
learner`` and ``online.actor_resource: rollout`` the learner must run on the first and the
rollout actors only on the second, although the learner node has CPUs to spare. A second rollout
node is then added, the node of a rollout actor removed mid-run, and the run must finish with
its actors restarted on the node left.

This module needs its own Ray, not the session's ``ray_session`` (one local node, 2 CPUs): its
fixture disconnects that one if it is up, and afterwards restarts it with the same arguments as
conftest.py, so tests in later modules that use ``ray_session`` keep working whatever the order.
It never runs ``ray stop``: that would kill every Ray on the machine.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.exceptions import ActorUnavailableError

from _helpers import SESSION_RAY, ray_address_file_kept, tiny_online_config
from distdiff import config as config_lib
from distdiff import provenance
from distdiff.checkpoint import load_checkpoint
from distdiff.distributed import actors
from distdiff.distributed.driver import Counters, OnlineRun, train
from distdiff.distributed.messages import unpack_tensors
from distdiff.pretrain import load_windows, pretrain

def node_of(actor, timeout: float = 120.0) -> str:
    """The node an actor runs on, waiting while Ray restarts it (calls fail fast meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(actor.node_id.remote(), timeout=timeout)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def cluster_config(dataset_id: str, **overrides):
    # placement: learner on the `learner` node, actors (half a CPU each) on `rollout` nodes
    return tiny_online_config(dataset_id, **{
        "online.learner_resource": "learner", "online.actor_resource": "rollout",
        "online.learner_num_cpus": 1, "online.actor_num_cpus": 0.5, **overrides})


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
    cfg = cluster_config(tiny_dataset)
    return cfg, pretrain(cfg, tmp_path_factory.mktemp("cluster_pretrained"), quiet=True)


@pytest.fixture(scope="module")
def cluster():
    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    try:
        # Cluster() points `ray.init(address="auto")` on this machine at itself.
        with ray_address_file_kept():
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            try:
                # Ray waits 30 s for each node to register: more on a slow machine.
                learner = c.add_node(wait=False, num_cpus=2, resources={"learner": 1})
                rollout = c.add_node(wait=False, num_cpus=1, resources={"rollout": 1})
                c.wait_for_nodes(timeout=120)
                ray.init(address=c.address, logging_level="warning")
                yield SimpleNamespace(cluster=c, head=c.head_node, learner=learner, rollout=rollout)
            finally:
                ray.shutdown()
                c.shutdown()
    finally:
        if was_up:
            ray.init(**SESSION_RAY)


def test_placement_resources_must_be_custom_resource_names():
    for field in ("online.learner_resource", "online.actor_resource"):
        for bad in ("GPU", "CPU", "node:127.0.0.1", " learner"):
            with pytest.raises(config_lib.ConfigError, match=field):
                cluster_config("local/unused-v0", **{field: bad})


def planned(nodes, **overrides):
    """actors.plan_resources on made-up nodes (no Ray needed): automatic actor CPUs unless given."""
    return actors.plan_resources(tiny_online_config("local/unused-v0", **{
        "online.actor_num_cpus": 0.0, "online.learner_num_cpus": 1.0, **overrides}), nodes)


def test_the_automatic_actor_share_places_every_actor_node_by_node():
    # 47/48 of a CPU each (the cluster's free CPUs split evenly) fits 15 + 16 + 16 = 47 actors
    # on three 16-CPU nodes, wherever the learner lands: one would never start, and its share
    # of the budget would keep the run from ending.
    three = [{"CPU": 16.0}] * 3
    res = planned(three, **{"online.num_actors": 48})
    assert res.actors_that_fit == 48
    assert res.actor_cpus == 0.9411  # 16/17 in Ray's 1e-4 units: 15 + 17 + 17 >= 48
    assert planned(three, **{"online.num_actors": 47}).actor_cpus == 1.0  # one per core
    # A laptop: the learner's CPU out of two, the other shared by 32 actors.
    laptop = planned([{"CPU": 2.0}], **{"online.num_actors": 32})
    assert laptop.actor_cpus == 0.0312 and laptop.actors_that_fit == 32
    # A learner that takes every CPU leaves the actors none, whichever node.
    with pytest.raises(config_lib.ConfigError, match="leaves none for the rollout actors"):
        planned([{"CPU": 1.0}])


def test_given_actor_cpus_are_counted_node_by_node():
    # 3 CPUs in all hold three 1-CPU actors, but no node holds two.
    res = planned([{"CPU": 1.5}] * 2, **{"online.num_actors": 3, "online.actor_num_cpus": 1.0,
                                         "online.learner_num_cpus": 0.0})
    assert res.actors_that_fit == 2


def test_the_learner_takes_cpus_only_from_nodes_it_can_run_on():
    gpu_node = {"CPU": 8.0, "GPU": 1.0, "learner": 1.0}
    cpu_nodes = [{"CPU": 4.0, "rollout": 1.0}] * 2
    labels = {"online.learner_resource": "learner", "online.actor_resource": "rollout", "online.num_actors": 8}
    res = planned([gpu_node, *cpu_nodes], **labels)
    assert res.learner_gpus == 1.0 and res.actor_cpus == 1.0 and res.actors_that_fit == 8
    # Without the labels the learner (one GPU) can only land on the GPU node: the actors lose its CPU there.
    res = planned([gpu_node, *cpu_nodes], **{"online.num_actors": 16})
    assert res.learner_gpus == 1.0 and res.actor_cpus == 0.875 and res.actors_that_fit == 16  # 8 + 4 + 4
    # learner_num_gpus -1 takes a GPU only where the learner may run: not on a labelled CPU head.
    head = {"CPU": 4.0, "learner": 1.0}
    res = planned([head, {"CPU": 8.0, "GPU": 1.0}], **{"online.learner_resource": "learner"})
    assert res.learner_gpus == 0.0 and res.learner_fits and res.gpus_elsewhere  # (which the run says)
    # A GPU learner asked for where no labelled node has one cannot be placed yet.
    res = planned([head, {"CPU": 8.0, "GPU": 1.0}], **{"online.learner_resource": "learner", "online.learner_num_gpus": 1})
    assert not res.learner_fits and not res.gpus_elsewhere


def test_learner_and_actors_run_on_the_nodes_their_resources_name(cluster, pretrained, tmp_path, monkeypatch):
    cfg, ckpt = pretrained
    res = actors.resources(cfg)
    assert res.learner_resources == {"learner": actors.LABEL_AMOUNT}
    assert res.actor_resources == {"rollout": actors.LABEL_AMOUNT}
    placed = {"learner": [], "workers": [], "replay": []}
    make_learner, make_worker, make_replay = actors.make_learner, actors.make_worker, actors.make_replay

    def learner(*args, **kwargs):
        handle = make_learner(*args, **kwargs)
        placed["learner"].append(ray.get(handle.node_id.remote(), timeout=120))
        return handle

    def worker(*args, **kwargs):
        handle = make_worker(*args, **kwargs)
        placed["workers"].append(handle.node_id.remote())
        return handle

    def replay(*args, **kwargs):
        handle = make_replay(*args, **kwargs)
        placed["replay"].append(handle.node_id.remote())
        return handle

    monkeypatch.setattr(actors, "make_learner", learner)
    monkeypatch.setattr(actors, "make_replay", replay)
    monkeypatch.setattr(actors, "make_worker", worker)
    metrics = train(cfg, tmp_path, init=ckpt, log=lambda s: None, progress=False)
    assert placed["learner"] == [cluster.learner.node_id]
    assert ray.get(placed["workers"], timeout=60) == [cluster.rollout.node_id] * cfg.online.num_actors
    # the replay stays with the driver, on the head: losing a rollout node never loses it
    assert ray.get(placed["replay"], timeout=60) == [cluster.head.node_id]
    assert metrics["env_steps"] == cfg.online.env_steps
    assert metrics["updates"] == int(cfg.online.updates_per_env_step * metrics["env_steps"])


def test_the_code_check_runs_on_every_node(cluster):
    from distdiff.distributed.cluster import RunFailed
    from distdiff.provenance import DRIVER_CODE

    nodes = [cluster.head.node_id, cluster.learner.node_id, cluster.rollout.node_id]
    assert sorted(actors.check_code_on_every_node(DRIVER_CODE)) == sorted(nodes)
    with pytest.raises(RunFailed, match="is not the driver's at /opt/distdiff on another-node"):
        actors.check_code_on_every_node(("0" * 16, "/opt/distdiff on another-node"))


def test_run_finishes_on_the_remaining_node_when_a_rollout_node_is_removed(cluster, pretrained, tmp_path):
    cfg, ckpt = pretrained
    cfg = cluster_config(cfg.data.dataset_id, **{"online.env_steps": 400})
    second = cluster.cluster.add_node(wait=False, num_cpus=1, resources={"rollout": 1})
    cluster.cluster.wait_for_nodes(timeout=120)
    state = load_checkpoint(ckpt)
    data, _ = load_windows(cfg, None)
    run = OnlineRun(cfg, tmp_path, state, data.episodes, Counters(), log=lambda s: None, progress=False)
    try:
        before = [node_of(w) for w in run.workers]
        assert set(before) <= {cluster.rollout.node_id, second.node_id}
        # Remove the node that worker 0 runs on when the first rollout arrives, from the driver's
        # own loop: the run cannot end first, and that worker is then either mid-rollout or
        # about to be handed its next one.
        doomed = cluster.rollout if before[0] == cluster.rollout.node_id else second
        survivor = second if doomed is cluster.rollout else cluster.rollout
        log_rollout = run.log_rollout

        def remove_then_log(result, *args):
            if doomed in cluster.cluster.worker_nodes:
                cluster.cluster.remove_node(doomed)
            log_rollout(result, *args)

        run.log_rollout = remove_then_log
        run.run()
        assert doomed not in cluster.cluster.worker_nodes, "the node was never removed"
        assert run.counters.worker_restarts >= 1
        # Every delivered trajectory reached the replay, and the budget was collected exactly.
        stored = unpack_tensors(ray.get(run.replay.state_dict.remote()))
        assert int(stored["lengths"].sum()) == run.counters.env_steps == cfg.online.env_steps
        assert stored["added_episodes"] == run.counters.episodes
        after = [node_of(w) for w in run.workers]
        assert after == [survivor.node_id] * cfg.online.num_actors
        assert node_of(run.learner) == cluster.learner.node_id
    finally:
        run.close()


def test_a_learner_given_no_gpu_stays_on_cpu_on_a_gpu_node():
    assert planned([{"CPU": 8.0, "GPU": 1.0}], **{"online.learner_num_gpus": 0}).learner_gpus == 0.0
    assert planned([{"CPU": 8.0, "GPU": 1.0}], **{"online.learner_num_gpus": -1}).learner_gpus == 1.0


def test_actors_must_fit_wherever_the_learner_lands():
    # Learner (1 CPU) on the 3-CPU node leaves 2 + 2.5: one 1.5-CPU actor each; on the other, 3 + 1.5: three.
    res = planned([{"CPU": 3.0}, {"CPU": 2.5}], **{"online.actor_num_cpus": 1.5, "online.num_actors": 3})
    assert res.actors_that_fit == 2


def test_a_node_too_small_for_the_learner_counts_no_negative_room():
    res = planned([{"CPU": 0.5}, {"CPU": 8.0}], **{"online.actor_num_cpus": 3.0, "online.num_actors": 2})
    assert res.actors_that_fit == 2


def test_the_automatic_share_is_at_most_one_cpu():
    res = planned([{"CPU": 8.0}], **{"online.num_actors": 2})
    assert res.actor_cpus == 1.0 and res.actors_that_fit == 2


def test_actors_waiting_for_their_labelled_nodes_are_not_refused():
    res = planned([{"CPU": 1.0}], **{"online.actor_resource": "rollout"})  # an autoscaler adds "rollout" nodes
    assert res.actor_cpus == 0.001 and res.actors_that_fit == 2


def test_a_given_actor_share_on_nodes_the_learner_fills_fits_no_actor():
    # A 1-CPU cluster (--num-cpus 1, a 1-CPU job): the learner takes it all, so the run says the
    # actors wait, rather than pretraining and then waiting in silence. No node at all: unknown.
    for share in (1.0, 0.5):
        assert planned([{"CPU": 1.0}], **{"online.actor_num_cpus": share}).actors_that_fit == 0
        assert planned([], **{"online.actor_num_cpus": share}).actors_that_fit == 2


def test_a_node_with_exactly_the_learners_cpus_holds_it():
    res = planned([{"CPU": 2.0}, {"CPU": 2.0}], **{"online.learner_num_cpus": 2.0, "online.actor_num_cpus": 1.0})
    assert res.learner_fits


def test_gpus_elsewhere_only_when_the_automatic_learner_got_none():
    assert not planned([{"CPU": 8.0, "GPU": 1.0}], **{"online.learner_num_gpus": -1}).gpus_elsewhere


def test_custom_resources_are_asked_as_labels_not_whole_units():
    res = planned([{"CPU": 8.0, "GPU": 1.0, "learner": 1.0}, {"CPU": 8.0, "rollout": 1.0}],
                  **{"online.learner_resource": "learner", "online.actor_resource": "rollout", "online.num_actors": 4})
    assert res.actor_resources == {"rollout": actors.LABEL_AMOUNT} and res.learner_resources == {"learner": actors.LABEL_AMOUNT}
    assert actors.LABEL_AMOUNT < 0.01 and res.actors_that_fit == 4



def test_a_trials_bundles_are_its_driver_the_learner_then_one_per_actor():
    # tuning.trial_resources' layout, with and without the driver's bundle (which Ray leaves
    # out when the driver asks for nothing). Another actor's bundle would starve the learner's GPU node.
    for driver in (0, 1):
        n = driver + 1 + 3
        assert actors.bundle_of(n, 3) == driver
        assert [actors.bundle_of(n, 3, i) for i in range(3)] == [driver + 1, driver + 2, driver + 3]
    assert actors.bundle_of(6, 3) is None and actors.bundle_of(3, 3) is None


def test_an_address_whose_port_is_not_a_number_is_left_to_ray_to_judge():
    # `--address localhost:637O` (a typo): Ray's own error names it; a ValueError from int()
    # here would not.
    from distdiff.distributed.cluster import _listens

    assert _listens("localhost:637O") is None and _listens("[::1]:port") is None



def test_the_code_digest_does_not_depend_on_the_order_files_are_listed(monkeypatch):
    # Two nodes with the same install list its files in their filesystems' orders: a digest that
    # followed it would refuse every actor on the other node.
    listed = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(listed(self, pattern))))
    assert provenance._digest() == provenance.CODE_DIGEST


def test_the_code_digest_tells_apart_the_same_bytes_in_other_files(tmp_path, monkeypatch):
    import distdiff

    pkg = tmp_path / "distdiff"
    pkg.mkdir()
    monkeypatch.setattr(distdiff, "__file__", str(pkg / "__init__.py"))
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("y = 2\n")
    first = provenance._digest()
    (pkg / "a.py").write_text("x = 1\ny = 2\n")
    (pkg / "b.py").write_text("")
    assert provenance._digest() != first


def test_a_code_mismatch_says_which_of_its_causes_it_is():
    host = socket.gethostname()
    here = provenance.DRIVER_CODE[1]
    provenance.check_same_code(None)
    provenance.check_same_code(provenance.DRIVER_CODE)
    with pytest.raises(RuntimeError, match="its files changed after the driver started"):
        provenance.check_same_code(("0" * 16, here))
    with pytest.raises(RuntimeError, match="non-editable install run from the source tree"):
        provenance.check_same_code(("0" * 16, f"/elsewhere/distdiff on {host}"))
    with pytest.raises(RuntimeError, match="install the same version on every node"):
        provenance.check_same_code(("0" * 16, "/opt/distdiff on another-host-xyz"))
