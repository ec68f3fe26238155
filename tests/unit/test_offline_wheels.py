"""scripts/offline_wheels.py: what can be checked without a package index."""

from __future__ import annotations

import zipfile
from importlib.metadata import version

from tests.helpers.scripts import load_script

ow = load_script("offline_wheels")


def test_pins_are_the_versions_this_checkout_runs():
    assert ow.pins(["ray", "deepspeed"]) == [
        f"ray=={version('ray')}",
        f"deepspeed=={version('deepspeed')}",
    ]


def test_slim_ray_drops_only_the_unused_parts_and_their_record_lines(tmp_path):
    wheel = tmp_path / "ray-1-cp312-cp312-x.whl"
    kept = ["ray/__init__.py", "ray/core/src/ray/raylet/raylet", "ray/dashboard/modules/a.py"]
    dropped = ["ray/jars/ray.jar", "ray/rllib/a.py", "ray/dashboard/client/build/x.js"]
    record = "\n".join(f"{name},sha256=x,1" for name in kept + dropped)
    with zipfile.ZipFile(wheel, "w") as z:
        for name in kept + dropped:
            z.writestr(name, "x")
        z.writestr("ray-1.dist-info/RECORD", record)
    ow.slim_ray(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        lines = z.read("ray-1.dist-info/RECORD").decode().splitlines()
    assert names == {*kept, "ray-1.dist-info/RECORD"}
    assert [line.split(",")[0] for line in lines] == kept
    assert not list(tmp_path.glob("*.slim"))
