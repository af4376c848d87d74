"""The --dp text form: parse, defaults, errors, and the inverse."""

from __future__ import annotations

import pytest

from edgefl.privacy import AccountantKind, CentralDP, LocalDP, LocalMechanism, dp_to_text, parse_dp


def test_central_with_every_key() -> None:
    got = parse_dp("central:z=2.5,C=0.3,eps=4,delta=1e-6,cap=7,accountant=pld,seed=3")

    assert got == CentralDP(
        noise_multiplier=2.5,
        clip_norm=0.3,
        target_epsilon=4.0,
        delta=1e-6,
        max_participations=7,
        accountant=AccountantKind.PLD,
        seed=3,
    )


def test_a_cap_alone_means_no_target_and_omitted_keys_take_the_defaults() -> None:
    got = parse_dp("central:cap=5")

    assert isinstance(got, CentralDP)
    assert got.target_epsilon is None
    assert got.participation_cap == 5
    assert got.noise_multiplier == CentralDP().noise_multiplier


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("local:gaussian,eps=8,C=0.3", LocalDP(epsilon=8.0, clip_norm=0.3)),
        ("local:eps=2", LocalDP(epsilon=2.0)),
        (
            "local:laplace,eps=2,C=1,budget=20",
            LocalDP(LocalMechanism.LAPLACE, clip_norm=1.0, epsilon=2.0, budget_epsilon=20.0),
        ),
    ],
)
def test_local(text: str, expected: LocalDP) -> None:
    assert parse_dp(text) == expected


@pytest.mark.parametrize(
    "dp",
    [
        None,
        CentralDP(),
        CentralDP(target_epsilon=None, max_participations=3, seed=1),
        LocalDP(LocalMechanism.LAPLACE, budget_epsilon=9.0),
    ],
)
def test_text_round_trips(dp: CentralDP | LocalDP | None) -> None:
    assert parse_dp(dp_to_text(dp)) == dp


BAD = {
    "global:z=1": "central, local or off",
    "central:z": "bad dp option",
    "central:budget=3": "bad dp option",
    "central:z=abc": "not a noise_multiplier value",
    "local:gauss": "gauss",
    "off:z=1": "no options",
}


@pytest.mark.parametrize("text", list(BAD))
def test_errors_name_the_problem(text: str) -> None:
    with pytest.raises(ValueError, match=BAD[text]):
        parse_dp(text)
