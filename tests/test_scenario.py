import pytest
from conftest import ROOT

from fedtiny.scenario import ScenarioError, load_scenario, parse_overrides, scenario_from_dict, schema_rows


def write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_quickstart_is_valid():
    s = load_scenario(ROOT / "scenarios" / "quickstart.toml")
    assert s.run.name == "quickstart" and s.run.clients == 10 and s.clients_per_round == 10


def test_defaults_fill_missing_keys(tmp_path):
    s = load_scenario(write(tmp_path, "[run]\nrounds = 3\n"))
    assert s.run.rounds == 3 and s.data.source == "digits" and s.train.batch_size == 16


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("[run]\nroudns = 3\n", ["run.roudns", "unknown key", "did you mean 'rounds'"]),
        ("[rnu]\nrounds = 3\n", ["[rnu]", "unknown section", "did you mean 'run'"]),
        ("[run]\nrounds = 'ten'\n", ["run.rounds", "expected int", "str"]),
        ("[run]\nrounds = 0\n", ["run.rounds", "must be >= 1"]),
        ("[train]\nlr = -0.1\n", ["train.lr", "must be >= 0.0"]),
        ("[data]\npartition = 'zipf'\n", ["data.partition", "must be one of"]),
        ("[run]\nclients = 4\nclients_per_round = 5\n", ["run.clients_per_round", "<= run.clients"]),
        ("[data]\nsource = 'mnist'\n", ["data.root", "needs a local dataset root"]),
        ("[run]\nseed = true\n", ["run.seed", "bool"]),
        ("[run\n", ["invalid TOML"]),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    for f in fragments:
        assert f in msg


def test_missing_file():
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario("does/not/exist.toml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "[run]\nrounds = 3\n")
    s = load_scenario(path, parse_overrides(["train.lr=0.1", "run.name=abc", "data.partition=dirichlet"]))
    assert s.train.lr == 0.1 and s.run.name == "abc" and s.data.partition == "dirichlet"
    s = load_scenario(path, parse_overrides("train.lr=1; run.rounds=7"))
    assert isinstance(s.train.lr, float) and s.run.rounds == 7
    with pytest.raises(ScenarioError, match="train.lrr: unknown key"):
        load_scenario(path, parse_overrides(["train.lrr=0.1"]))
    with pytest.raises(ScenarioError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_json_round_trip():
    s = scenario_from_dict({"run": {"rounds": 4}})
    from fedtiny.scenario import scenario_from_json

    assert scenario_from_json(s.to_json()) == s
    assert s.to_json() == scenario_from_json(s.to_json()).to_json()
    assert s.to_json() != scenario_from_dict({"run": {"rounds": 5}}).to_json()


def test_every_key_is_documented():
    rows = schema_rows()
    assert len(rows) > 20 and all(help_ for *_, help_ in rows)


def test_cli_misspelled_key_exits_2_with_one_line(tmp_path, cli):
    path = write(tmp_path, (ROOT / "scenarios" / "quickstart.toml").read_text().replace("local_epochs", "local_epoch"))
    proc = cli("run", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.local_epoch" in lines[0] and str(path) in lines[0] and "Traceback" not in proc.stderr


def test_cli_missing_dataset_root_exits_2(tmp_path, cli):
    proc = cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "data.source=mnist",
        "--set",
        f"data.root={tmp_path / 'nowhere'}",
    )
    assert proc.returncode == 2
    assert "data.root" in proc.stderr and "never downloads" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_method_exits_2_naming_the_methods(cli):
    proc = cli("run", str(ROOT / "scenarios" / "compression.toml"), "--method", "no-such-method")
    assert proc.returncode == 2
    assert "no-such-method" in proc.stderr and "dense-fp32" in proc.stderr and "Traceback" not in proc.stderr


def test_list_valued_keys_are_typed_and_old_comma_strings_still_load(tmp_path):
    new = write(
        tmp_path,
        '[device]\nprofiles = ["nrf52832", "stm32g031"]\n[attack]\nclients = [0, 3]\n'
        'rounds = [1, 2]\n[bridge.devices]\n1 = "127.0.0.1:7070"\n',
    )
    old = tmp_path / "old.toml"
    old.write_text(
        '[device]\nprofiles = "nrf52832, stm32g031"\n[attack]\nclients = "0,3"\nrounds = "1,2"\n'
        '[bridge]\ndevices = "1=127.0.0.1:7070"\n'
    )
    s = load_scenario(new)
    assert s.device.profiles == ("nrf52832", "stm32g031")
    assert s.attack.clients == (0, 3) and s.attack.rounds == (1, 2)
    assert s.device_address(1) == "127.0.0.1:7070" and s.device_address(0) == ""
    assert load_scenario(old) == s
    # The canonical form is TOML arrays and a table, and it reads back the same.
    d = s.to_dict()
    assert d["attack"]["clients"] == [0, 3] and d["bridge"]["devices"] == {"1": "127.0.0.1:7070"}
    from fedtiny.scenario import scenario_from_json

    assert scenario_from_json(s.to_json()) == s
    assert load_scenario(new, parse_overrides(["attack.clients=5"])).attack.clients == (5,)
    assert load_scenario(new, parse_overrides(["attack.clients=[5, 6]"])).attack.clients == (5, 6)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[attack]\nclients = ["a"]\n', "attack.clients: expected a list of integers"),
        ('[attack]\nclients = "0,x"\n', "attack.clients: expected a list of integers"),
        ("[attack]\nrounds = [0]\n", "attack.rounds: item 0: must be >= 1"),
        ("[device]\nprofiles = []\n", "device.profiles: must not be empty"),
        ('[device]\nprofiles = ["z80"]\n', "device.profiles: unknown profile 'z80'"),
        ('[bridge.devices]\nx = "h:1"\n', "bridge.devices: partition 'x' is not a partition id"),
        (
            '[bridge.devices]\n1 = "nohost"\n',
            "bridge.devices: partition 1: device address 'nohost': expected HOST:PORT",
        ),
        ('[bridge]\ndevices = "1"\n', "bridge.devices: expected PARTITION=ADDRESS"),
        (
            '[bridge.devices]\n1 = "serial:/dev/ttyACM0@fast"\n',
            "bridge.devices: partition 1: device address 'serial:/dev/ttyACM0@fast': the baud rate",
        ),
        (
            '[bridge.devices]\n1 = "serial:"\n',
            "bridge.devices: partition 1: device address 'serial:': a serial port is",
        ),
        ("[bridge.devices]\n1 = 7070\n", "bridge.devices: partition 1: device address 7070"),
    ],
)
def test_bad_list_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write(tmp_path, text))


def test_an_optimizer_is_registered_and_chosen_by_name():
    """An optimizer kind carries its own update: one registered here is a scenario choice and trains a model; the
    memory model asks it for its state (Adam's two moments, SGD's momentum buffer)."""
    import torch

    from fedtiny.budget.memory import optimizer_slots
    from fedtiny.federated.train import make_optimizer
    from fedtiny.int8 import optimizers
    from fedtiny.int8.optimizers import OptimizerKind, register

    assert (optimizer_slots("adam", 0.0), optimizer_slots("sgd", 0.9), optimizer_slots("sgd+qas", 0.0)) == (2, 1, 0)
    register(
        OptimizerKind(
            "test-half-sgd",
            "SGD at half the rate",
            exact=False,
            torch=lambda params, lr, momentum: torch.optim.SGD(params, lr=lr / 2),
        )
    )
    try:
        s = load_scenario(
            ROOT / "scenarios" / "quickstart.toml",
            parse_overrides(['train.optimizer="test-half-sgd"', 'train.gradients="float"']),
        )
        assert s.train.optimizer == "test-half-sgd"
        with pytest.raises(ScenarioError, match="train.gradients: the exact step"):
            load_scenario(ROOT / "scenarios" / "quickstart.toml", parse_overrides(['train.optimizer="test-half-sgd"']))
        moved = {}
        for name in ("sgd", "test-half-sgd"):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 2)
            before = model.weight.detach().clone()
            opt = make_optimizer(model, name, 0.1)
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
            moved[name] = model.weight.detach() - before
        assert torch.allclose(moved["test-half-sgd"], moved["sgd"] / 2) and moved["sgd"].abs().sum() > 0
    finally:  # the scenario reference (tests/test_docs.py) lists the built-in optimizers
        del optimizers._KINDS["test-half-sgd"]
