"""Tests of solver/link_floors.py: the integer split over rates and the triangle links."""

from __future__ import annotations

import itertools
import math

import numpy as np

from solver.space import ClassSpace
from tests.class_bound_cases import same_compute_instance


def test_triangle_links_bound_every_group_of_three() -> None:
    from solver.link_floors import triangle_links

    for seed in range(600, 620):
        costs, cluster, _ = same_compute_instance(seed, max_layers=2, max_devices=5)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        bw, lat = triangle_links(space)
        names = space.names
        for trio in itertools.combinations(names, 3):
            pairs = [(a, b) for a in trio for b in trio if a != b]
            assert min(cluster.bandwidth_bytes_s(a, b) for a, b in pairs) <= bw
            assert cluster.max_latency_s(list(trio)) >= lat


def test_min_max_ratio_is_the_greedy_split_bit_for_bit() -> None:
    # the heap over distinct rates gives the same float as Algorithm 1's greedy over every
    # device ([Note: the greedy by equal rates] in solver/link_floors.py)
    import random

    from solver.link_floors import min_max_ratio
    from solver.split import split_shares

    rng = random.Random(3)
    for _ in range(3000):
        pool = [rng.choice([0.3, 1.0, 2.5, 7.0, 1.0 / 3, 12.5e6]) for _ in range(3)]
        rates = [rng.choice(pool) if rng.random() < 0.7 else rng.uniform(0.1, 10.0)
                 for _ in range(rng.randint(1, 8))]
        mb = rng.randint(1, 70)
        shares = split_shares(mb, rates)
        expected = None if shares is None else max(b / r for b, r in zip(shares, rates,
                                                                         strict=True))
        assert min_max_ratio(mb, rates) == expected


def test_min_max_ratios_are_min_max_ratio_per_count_vector() -> None:
    # the count vectors at once: the same floats as min_max_ratio on each vector's rates,
    # NaN where it is None (no devices, more devices than samples), and infinite rates
    import random

    from solver.link_floors import min_max_ratio, min_max_ratios

    rng = random.Random(4)
    nans = 0
    for trial in range(1500):
        rates = [rng.choice([0.5, 1.0, 1.5, 1.0 / 3, 12.5e6, rng.uniform(0.1, 5.0)])
                 for _ in range(rng.randint(1, 4))]
        if trial % 50 == 0:
            rates[0] = math.inf
        mb = rng.randint(1, 70)
        counts = np.asarray([[rng.randint(0, 6) for _ in rates] for _ in range(12)])
        got = min_max_ratios(mb, rates, counts)
        for row, value in zip(counts, got, strict=True):
            expected = min_max_ratio(mb, [r for r, c in zip(rates, row, strict=True)
                                          for _ in range(int(c))])
            if expected is None:
                nans += 1
                assert math.isnan(value), (rates, mb, row)
            else:
                assert value == expected, (rates, mb, row)
    assert nans > 100
