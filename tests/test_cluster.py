"""Tests of contracts.cluster: YAML loading, validation, bandwidth and speeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from contracts.cluster import Cluster
from contracts.devices import DEVICE_TYPES, GIB
from contracts.errors import ClusterError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "clusters"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_design_example_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, """
devices:
  - {name: nx0,   type: jetson-xavier-nx}
  - {name: tx2-0, type: jetson-tx2}
  - {name: nano0, type: jetson-nano, memory_gb: 4}
  - {name: me,    type: local}
  - {name: phone, type: custom, speed: 0.7, memory_gb: 3}
network:
  bandwidth_mbps: 100
  links:
    - {between: [nx0, tx2-0], bandwidth_mbps: 1000}
""")
    cluster = Cluster.from_yaml(path)
    assert cluster.names == ("nx0", "tx2-0", "nano0", "me", "phone")
    assert cluster.bandwidth_mbps_between("nx0", "tx2-0") == 1000
    assert cluster.bandwidth_mbps_between("tx2-0", "nx0") == 1000
    assert cluster.bandwidth_mbps_between("nx0", "nano0") == 100
    assert cluster.bandwidth_bytes_s("nx0", "nano0") == pytest.approx(100e6 / 8)
    assert cluster.device("phone").memory_bytes == 3 * GIB
    host_flops = 50e9
    speeds = cluster.speeds(host_flops)
    assert speeds["me"] == 1.0
    assert speeds["phone"] == 0.7
    nano_flops = DEVICE_TYPES["jetson-nano"].flops
    assert nano_flops is not None
    assert speeds["nano0"] == pytest.approx(nano_flops / host_flops)
    assert speeds["nx0"] > speeds["tx2-0"] > speeds["nano0"]


def test_json_round_trip_and_hash() -> None:
    cluster = Cluster.from_yaml(EXAMPLES / "C-100mbps.yaml")
    again = Cluster.from_json(cluster.to_json())
    assert again == cluster
    assert again.cluster_hash == cluster.cluster_hash
    other = Cluster.from_yaml(EXAMPLES / "C-1000mbps.yaml")
    assert other.cluster_hash != cluster.cluster_hash


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_cluster_loads(name: str) -> None:
    cluster = Cluster.from_yaml(EXAMPLES / name)
    assert len(cluster.devices) >= 3


def test_count_stands_for_devices_alike(tmp_path: Path) -> None:
    counted = Cluster.from_yaml(_write(tmp_path, """
devices:
  - {name: nano, type: jetson-nano, count: 3, memory_gb: 2}
  - {name: me, type: local, count: 1}
network:
  bandwidth_mbps: 100
  links: [{between: [nano0, nano2], bandwidth_mbps: 1000}]
"""))
    spelled = Cluster.from_yaml(_write(tmp_path, """
devices:
  - {name: nano0, type: jetson-nano, memory_gb: 2}
  - {name: nano1, type: jetson-nano, memory_gb: 2}
  - {name: nano2, type: jetson-nano, memory_gb: 2}
  - {name: me0, type: local}
network:
  bandwidth_mbps: 100
  links: [{between: [nano0, nano2], bandwidth_mbps: 1000}]
"""))
    assert counted == spelled
    assert counted.names == ("nano0", "nano1", "nano2", "me0")
    assert counted.device("nano1").memory_bytes == 2 * GIB
    assert counted.bandwidth_mbps_between("nano2", "nano0") == 1000
    # what it writes is the devices one by one, and reads back the same
    assert Cluster.from_json(counted.to_json()) == counted


def test_the_example_fleet_is_the_benchmarks_fleet() -> None:
    fleet = Cluster.from_yaml(EXAMPLES / "fleet-32.yaml")
    types = [d.type for d in fleet.devices]
    assert (types.count("jetson-xavier-nx"), types.count("jetson-tx2"),
            types.count("jetson-nano")) == (11, 11, 10)
    assert len(fleet.links) == 10
    wired = {name for link in fleet.links for name in (link.a, link.b)}
    assert len(wired) == 20     # ten disjoint pairs
    assert all(link.bandwidth_mbps == 1000 and link.latency_ms == 0.2 for link in fleet.links)
    assert fleet.bandwidth_mbps == 100 and fleet.latency_ms == 2
    from tools.time_planner import fleet as bench_fleet

    bench = bench_fleet(32)
    assert {(d.name, d.type) for d in bench.devices} == {(d.name, d.type) for d in fleet.devices}
    assert {frozenset((k.a, k.b)) for k in bench.links} == \
        {frozenset((k.a, k.b)) for k in fleet.links}


def test_subset_keeps_links(tmp_path: Path) -> None:
    path = _write(tmp_path, """
devices: [{name: a, type: local}, {name: b, type: local}, {name: c, type: local}]
network: {bandwidth_mbps: 10, links: [{between: [a, b], bandwidth_mbps: 50}]}
""")
    cluster = Cluster.from_yaml(path)
    assert cluster.subset(["a", "b"]).bandwidth_mbps_between("a", "b") == 50
    assert cluster.subset(["a", "c"]).links == ()


def test_latency_default_and_per_link(tmp_path: Path) -> None:
    path = _write(tmp_path, """
devices: [{name: a, type: local}, {name: b, type: local}, {name: c, type: local}]
network:
  bandwidth_mbps: 100
  latency_ms: 2
  links:
    - {between: [a, b], latency_ms: 0.5}
    - {between: [b, c], bandwidth_mbps: 10}
""")
    cluster = Cluster.from_yaml(path)
    assert cluster.latency_s("a", "b") == pytest.approx(0.0005)
    assert cluster.latency_s("b", "a") == pytest.approx(0.0005)
    assert cluster.latency_s("b", "c") == pytest.approx(0.002)     # bandwidth-only link
    assert cluster.latency_s("a", "a") == 0.0
    assert cluster.bandwidth_mbps_between("a", "b") == 100           # latency-only link
    assert cluster.bandwidth_mbps_between("b", "c") == 10
    assert cluster.max_latency_s(["a", "b", "c"]) == pytest.approx(0.002)
    assert cluster.max_latency_s(["a"]) == 0.0
    again = Cluster.from_json(cluster.to_json())
    assert again == cluster and again.cluster_hash == cluster.cluster_hash
    sub = cluster.subset(["a", "b"])
    assert sub.latency_s("a", "b") == pytest.approx(0.0005) and sub.latency_ms == 2.0


def test_no_latency_keeps_the_old_hash(tmp_path: Path) -> None:
    # clusters that do not mention latency hash (and serialise) as before it existed, so
    # plans made earlier still match their cluster file
    plain = Cluster.from_yaml(_write(tmp_path, "devices: [{name: a, type: local}]\n"
                                               "network: {bandwidth_mbps: 100}"))
    zero = Cluster.from_yaml(_write(tmp_path, "devices: [{name: a, type: local}]\n"
                                              "network: {bandwidth_mbps: 100, latency_ms: 0}"))
    assert "latency_ms" not in plain.to_dict()["network"]
    assert zero.cluster_hash == plain.cluster_hash
    slow = Cluster.from_yaml(_write(tmp_path, "devices: [{name: a, type: local}]\n"
                                              "network: {bandwidth_mbps: 100, latency_ms: 3}"))
    assert slow.cluster_hash != plain.cluster_hash


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("devices: [{name: a, type: jetson-nanoo}]", r"unknown device type 'jetson-nanoo'.*known"),
        ("devices: [{name: a, type: local}, {name: a, type: local}]", "duplicate device name 'a'"),
        ("devices: [{name: a, type: local}]\nnetwork: {bandwidth_mbps: 0}", "must be > 0"),
        ("devices: [{name: a, type: local}]\nnetwork: {bandwidth_mbps: -5}", "must be > 0"),
        ("devices: [{name: a, type: local}, {name: b, type: local}]\n"
         "network: {links: [{between: [a, zz], bandwidth_mbps: 5}]}", "unknown device 'zz'"),
        ("devices: [{name: a, type: local}, {name: b, type: local}]\n"
         "network: {links: [{between: [a], bandwidth_mbps: 5}]}", "a link is"),
        ("devices: [{name: a, type: custom, speed: 1}]", "needs memory_gb"),
        ("devices: [{name: a, type: custom, memory_gb: 1}]", "needs speed"),
        ("devices: [{name: a, type: local, speed: fast}]", "speed must be a number"),
        ("devices: []", "non-empty list"),
        ("devices: [{type: local}]", "non-empty string name"),
        ("devices: [{name: a, type: local, colour: red}]", "unknown device field"),
        ("hosts: []", "unknown top-level key"),
        ("devices: [{name: a, type: local}]\nnetwork: {latency_ms: -1}", "must be >= 0"),
        ("devices: [{name: a, type: local}]\nnetwork: {latency_ms: slow}",
         "number of milliseconds"),
        ("devices: [{name: a, type: local}]\nnetwork: {latency: 3}",
         r"unknown key\(s\) \['latency'\] under `network:`"),
        ("devices: [{name: a, type: local}, {name: b, type: local}]\n"
         "network: {links: [{between: [a, b]}]}", "a link is"),
        ("devices: [{name: a, type: local}, {name: b, type: local}]\n"
         "network: {links: [{between: [a, b], latency_ms: .nan}]}", "must be >= 0"),
        ("devices: [{name: a, type: local}, {name: b, type: local}]\n"
         "network: {links: [{between: [a, b], latency_ms: 1, jitter_ms: 2}]}", "a link is"),
        ("devices: [{name: a, type: local, workspace_mb: -1}]", "workspace_mb must be >= 0"),
        ("devices: [{name: a, type: local, storage_mb_s: 0}]", "storage_mb_s must be > 0"),
        ("devices: [{name: a, type: jetson-nano, workspace_mb: 4096}]",
         "workspace_mb 4096 leaves no memory"),
        ("devices: [{name: n, type: jetson-nano, count: 0}]", "count must be a whole number"),
        ("devices: [{name: n, type: jetson-nano, count: -2}]", "count must be a whole number"),
        ("devices: [{name: n, type: jetson-nano, count: 2.5}]", r"got 2\.5"),
        ("devices: [{name: n, type: jetson-nano, count: 'three'}]", "got 'three'"),
        ("devices: [{name: n, type: jetson-nano, count: true}]", "got True"),
        ("devices: [{type: jetson-nano, count: 2}]", "count needs a non-empty string name"),
        ("devices: [{name: n1, type: local}, {name: n, type: local, count: 2}]",
         r"duplicate device name 'n1'.*count: N names its devices"),
        ("devices: [{name: n, type: jetson-nano, count: 2}]\n"
         "network: {links: [{between: [n, n1], bandwidth_mbps: 5}]}", "unknown device 'n'"),
        ("- a\n- b", "a cluster file is a mapping"),
        ("devices: [{name: a, type: local}\n", "not valid YAML"),
    ],
)
def test_bad_clusters_raise_cluster_error(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ClusterError, match=match):
        Cluster.from_yaml(_write(tmp_path, text))


def test_missing_file() -> None:
    with pytest.raises(ClusterError, match="does not exist"):
        Cluster.from_yaml("no/such/cluster.yaml")


def test_a_tables_message_overhead_is_charged_once_per_message() -> None:
    from dataclasses import replace

    from solver.calibrate import with_message_overhead
    from solver.dp import asteroid_dp
    from solver.evaluate import evaluate
    from tests.solver_cases import make_cluster, uniform_costs

    costs = uniform_costs(4, param_bytes=1000, cut_bytes=1000)
    cluster = make_cluster([1.0, 0.5], bandwidth_mbps=8.0)
    slow = replace(costs, message_overhead_s=0.002)
    once = cluster.for_costs(slow)
    assert once.for_costs(slow) is once and once.cluster_hash == cluster.cluster_hash
    # paid at the slower end: d1 runs at half speed, so 4 ms
    assert once.latency_s("d0", "d1") == pytest.approx(0.004) and once.latency_s("d0", "d0") == 0
    result = asteroid_dp(slow, cluster, 8)
    assert result.plan is not None
    # the same as a cluster whose links are 4 ms slower, however the calls nest
    assert evaluate(result.plan, slow, cluster) == evaluate(
        result.plan, costs, with_message_overhead(cluster, 0.004))
    assert evaluate(result.plan, slow, once) == evaluate(result.plan, slow, cluster)
    assert result.round_time_s == evaluate(result.plan, slow, cluster).round_time_s


def test_a_message_pays_the_runtime_cost_of_its_slower_end() -> None:
    from dataclasses import replace

    from tests.solver_cases import make_cluster, uniform_costs

    costs = replace(uniform_costs(4), message_overhead_s=0.002)
    cluster = make_cluster([1.0, 1.0, 0.25]).for_costs(costs)
    assert cluster.message_cost_s("d0") == pytest.approx(0.002)
    assert cluster.message_cost_s("d2") == pytest.approx(0.008)
    assert cluster.latency_s("d0", "d1") == pytest.approx(0.002)
    assert cluster.latency_s("d0", "d2") == cluster.latency_s("d2", "d1") == pytest.approx(0.008)
    # a survivor keeps its own cost; a table without one charges nothing
    assert cluster.subset(["d1", "d2"]).latency_s("d1", "d2") == pytest.approx(0.008)
    assert make_cluster([1.0, 0.25]).for_costs(uniform_costs(4)).message_costs == ()


def test_a_measured_column_pays_its_own_message_cost() -> None:
    from dataclasses import replace

    from contracts.cluster import Cluster, Device
    from tests.solver_cases import uniform_costs

    costs = replace(uniform_costs(4), message_overhead_s=0.001)
    nano = replace(_column(costs, "jetson-nano"), message_overhead_s=0.003)
    tx2 = _column(costs, "jetson-tx2")            # measured times, no message cost
    table = replace(costs, columns=(nano, tx2))
    cluster = Cluster(devices=(Device("n", "jetson-nano", int(4e9), speed=0.2),
                               Device("t", "jetson-tx2", int(4e9), speed=0.5),
                               Device("h", "local", int(4e9), speed=1.0)),
                      bandwidth_mbps=100.0).for_costs(table)
    assert cluster.message_cost_s("n") == pytest.approx(0.003)     # as measured
    assert cluster.message_cost_s("t") == pytest.approx(0.002)     # the base over its speed
    assert cluster.message_cost_s("h") == pytest.approx(0.001)
    assert cluster.latency_s("h", "n") == pytest.approx(0.003)


def _column(costs: Any, device_type: str) -> Any:
    from contracts.table import DeviceColumn

    return DeviceColumn(device_type=device_type, fwd=tuple(lc.fwd for lc in costs.layers),
                        bwd=tuple(lc.bwd for lc in costs.layers))


def test_fixed_workspace_defaults_per_type_and_is_declared_per_device(tmp_path: Path) -> None:
    cluster = Cluster.from_yaml(_write(tmp_path, (
        "devices: [{name: n, type: jetson-nano}, {name: h, type: local},\n"
        "          {name: c, type: custom, speed: 1, memory_gb: 1},\n"
        "          {name: w, type: jetson-nano, workspace_mb: 64}]")))
    mib = 2**20
    # two cuBLAS workspaces of torch's default pre-Hopper size on a Jetson; none on a CPU
    assert cluster.workspace_bytes("n") == 2 * (2 * 4096 + 8 * 16) * 1024
    assert cluster.workspace_bytes("h") == 0
    assert cluster.workspace_bytes("c") == mib
    assert cluster.workspace_bytes("w") == 64 * mib
    assert cluster.usable_bytes("w") == 4 * 2**30 - 64 * mib
    # only a declared figure is written out: clusters that declare none keep their hash
    assert [("workspace_mb" in d.to_dict()) for d in cluster.devices] == [False, False, False,
                                                                          True]
    assert Cluster.from_dict(cluster.to_dict()) == cluster
    with pytest.raises(ClusterError, match="unknown device 'zz'"):
        cluster.workspace_bytes("zz")


def test_storage_bandwidth_is_declared_per_device_and_round_trips(tmp_path: Path) -> None:
    cluster = Cluster.from_yaml(_write(tmp_path, (
        "devices: [{name: n, type: jetson-nano, storage_mb_s: 80},\n"
        "          {name: h, type: local}]")))
    assert cluster.device("n").storage_mb_s == 80.0
    assert cluster.device("h").storage_mb_s is None
    # only a declared figure is written out: clusters that declare none keep their hash
    assert [("storage_mb_s" in d.to_dict()) for d in cluster.devices] == [True, False]
    assert Cluster.from_dict(cluster.to_dict()) == cluster


def test_a_tables_measured_workspace_applies_to_its_type_only() -> None:
    from types import SimpleNamespace

    cluster = Cluster.from_dict({"devices": [{"name": "n", "type": "jetson-nano"},
                                             {"name": "h", "type": "local"}]})
    measured = {"jetson-nano": 9 * 2**20}
    costs = SimpleNamespace(host_flops=1e9, message_cost_s=lambda t, v: 0.0,
                            workspace_of=measured.get)
    seen = cluster.for_costs(costs)
    assert seen.workspace_bytes("n") == 9 * 2**20 and seen.workspace_bytes("h") == 0
    assert seen.for_costs(costs) is seen                       # idempotent
    assert seen.cluster_hash == cluster.cluster_hash           # not part of the file
    assert seen.subset(["n"]).workspace_bytes("n") == 9 * 2**20


def test_an_infinite_number_is_called_so() -> None:
    # memory_gb: 1e400 overflows to inf; "must be > 0, got '1e400'" named the wrong fault
    from contracts.errors import ClusterError

    with pytest.raises(ClusterError, match="memory_gb must be finite and > 0, got '1e400'"):
        Cluster.from_dict({"devices": [{"name": "a", "type": "local", "memory_gb": "1e400"}]})
    with pytest.raises(ClusterError, match="memory_gb must be > 0, got 0 "):
        Cluster.from_dict({"devices": [{"name": "a", "type": "local", "memory_gb": 0}]})


def test_a_pair_whose_bandwidth_two_links_set_is_refused() -> None:
    # [a, X] at 1000 and [X, a] at 10: the first silently won; one may set the bandwidth
    # and another the latency of a pair
    from contracts.errors import ClusterError

    devices = [{"name": "a", "type": "local"}, {"name": "X", "type": "local"}]
    both = [{"between": ["a", "X"], "bandwidth_mbps": 1000},
            {"between": ["X", "a"], "bandwidth_mbps": 10}]
    with pytest.raises(ClusterError, match=r"links \['a', 'X'\] and \['X', 'a'\] both set "
                                           r"bandwidth_mbps of one pair"):
        Cluster.from_dict({"devices": devices, "network": {"links": both}})
    split = [{"between": ["a", "X"], "bandwidth_mbps": 1000},
             {"between": ["X", "a"], "latency_ms": 2}]
    cluster = Cluster.from_dict({"devices": devices, "network": {"links": split}})
    assert cluster.bandwidth_mbps_between("X", "a") == 1000.0
    assert cluster.link_latency_s("a", "X") == 0.002


@pytest.mark.parametrize("name", ["a b", "x@1", "p/q", "k=v", "a,b"])
def test_a_device_name_that_flags_cannot_spell_is_refused(name: str) -> None:
    # --fail NAME@STEP and comma lists of devices could not name such a device
    from contracts.errors import ClusterError

    with pytest.raises(ClusterError, match="names are written in flags such as --fail"):
        Cluster.from_dict({"devices": [{"name": name, "type": "local"}]})
    assert Cluster.from_dict({"devices": [{"name": "ok-1.x_2", "type": "local"}]}).names == (
        "ok-1.x_2",)


@pytest.mark.parametrize(("entry", "match"), [
    # 1e300 GiB overflowed int(); speed 1e308 reached the planner as NaN
    ({"name": "a", "type": "local", "memory_gb": 1e300}, "memory_gb must be at most 1e"),
    ({"name": "a", "type": "custom", "memory_gb": 4, "speed": 1e308}, "speed must be at most"),
    ({"name": "a", "type": "custom", "memory_gb": 4, "flops": 1e30}, "flops must be at most"),
    ({"name": "a", "type": "local", "memory_gb": 1e-12}, "less than one byte"),
    # count: 10**8 built devices for minutes
    ({"name": "a", "type": "local", "count": 10**8}, "count must be a whole number from 1 to"),
])
def test_numbers_past_any_device_are_refused(entry: dict[str, object], match: str) -> None:
    from contracts.errors import ClusterError

    with pytest.raises(ClusterError, match=match):
        Cluster.from_dict({"devices": [entry]})


def test_a_cluster_of_too_many_devices_is_refused_before_they_are_built() -> None:
    from contracts.cluster import MAX_DEVICES
    from contracts.errors import ClusterError

    entries = [{"name": f"g{i}x", "type": "local", "count": MAX_DEVICES} for i in range(3)]
    with pytest.raises(ClusterError, match=f"at most {MAX_DEVICES} devices"):
        Cluster.from_dict({"devices": entries})


def test_cluster_text_that_is_not_json_or_yaml_is_a_cluster_error(tmp_path: Path) -> None:
    from contracts.errors import ClusterError

    with pytest.raises(ClusterError, match="cluster is not valid JSON"):
        Cluster.from_json("{not json")
    with pytest.raises(ClusterError, match="cluster must be JSON text, got NoneType"):
        Cluster.from_json(None)  # type: ignore[arg-type]
    with pytest.raises(ClusterError, match="nested too deeply"):
        Cluster.from_json("[" * 100_000 + "]" * 100_000)
    deep = tmp_path / "deep.yaml"
    deep.write_text("devices: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ClusterError, match="nested too deeply"):
        Cluster.from_yaml(deep)
    with pytest.raises(ClusterError, match="cluster file 'None' does not exist"):
        Cluster.from_yaml(None)  # type: ignore[arg-type]
