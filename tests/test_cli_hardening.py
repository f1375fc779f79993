"""The command line as a new user meets it (issue 19): flags that parse wherever they stand, help text shown as
written, confirmations, and one-line errors that name what exists."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from ldot_cli.main import app

runner = CliRunner()


def _index_params(*args: str) -> dict:
    command = typer.main.get_command(app).commands["index"]
    return command.make_context("index", list(args)).params


@pytest.mark.parametrize("args, address, actors", [
    (["photos", "--ray"], None, None),  # last on the line
    (["--ray", "photos"], None, None),  # before PATHS: not taken for an address
    (["photos", "--ray", "--ray-actors", "1"], None, 1),
    (["photos", "--ray", "--ray-actors=1"], None, 1),
    (["photos", "--ray-actors", "1", "--ray"], None, 1),
    (["photos", "--ray", "--ray-address", "auto"], "auto", None),
    (["photos", "--ray-address=10.0.0.1:6379", "--ray-actors", "2"], "10.0.0.1:6379", 2),
])
def test_ray_is_a_flag_wherever_it_stands(args, address, actors):
    params = _index_params(*args)
    assert params["paths"] == ["photos"]
    assert params["ray"] or params["ray_address"]
    assert params["ray_address"] == address and params["ray_actors"] == actors


def test_without_ray_nothing_is_distributed():
    params = _index_params("photos", "--workers", "1")
    assert not params["ray"] and params["ray_address"] is None


def test_ray_address_is_documented_in_help():
    got = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "200"})
    assert got.exit_code == 0 and "--ray-address" in got.output and "ADDRESS" in got.output
