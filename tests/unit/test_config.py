"""Host config parsing: every refusal names the file, the key and what was expected."""

import pytest

from fenceless import config
from fenceless.errors import ConfigError, UsageError

GOOD = """
host = "h1"
state_dir = "/var/lib/fenceless"
io_timeout = 0.5
hypervisor_uri = "qemu:///system"

[vg.vmstore]
devices = ["/dev/disk/by-id/wwn-0x600a0b8000"]

[vg.images]
devices = ["/dev/sdc"]
"""


def test_good_config_parses():
    cfg = config.parse(GOOD, "/etc/f.toml")
    assert cfg.host == "h1"
    assert cfg.io_timeout == 0.5
    assert [v.name for v in cfg.vgs] == ["vmstore", "images"]
    assert cfg.vg("images").devices == ("/dev/sdc",)
    assert cfg.activation == "lvm"


def test_run_dir_is_a_tmpfs_by_default_and_round_trips():
    cfg = config.parse(GOOD, "/x.toml")
    assert cfg.run_dir == "/run/fenceless"
    other = config.parse('host = "h1"\nrun_dir = "/lab/h1/run"\n[vg.a]\ndevices=["/dev/sda"]',
                         "/x.toml")
    assert other.run_dir == "/lab/h1/run"
    assert config.parse(config.render(other), "/x.toml") == other


def test_render_round_trips():
    cfg = config.parse(GOOD, "/x.toml")
    again = config.parse(config.render(cfg), "/x.toml")
    assert again == cfg


def test_several_vgs_need_vg_option():
    cfg = config.parse(GOOD, "/etc/f.toml")
    with pytest.raises(UsageError, match="--vg"):
        cfg.vg(None)
    with pytest.raises(UsageError, match="not configured"):
        cfg.vg("other")


def test_single_vg_is_the_default():
    cfg = config.parse('host = "h2"\n[vg.a]\ndevices = ["/dev/loop3"]\n', "/p")
    assert cfg.vg(None).name == "a"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("host = ", "not valid TOML"),
        ('host = "h1"\nbogus = 1\n[vg.a]\ndevices=["/dev/sda"]', "unknown key 'bogus'"),
        ('host = "h1"\nio_timeout = "fast"\n[vg.a]\ndevices=["/dev/sda"]',
         "key 'io_timeout': expected a number of seconds, got 'fast' (string)"),
        ('host = "h1"\nio_timeout = 0\n[vg.a]\ndevices=["/dev/sda"]', "between 0.01 and 300"),
        ('host = "h1"\nio_timeout = true\n[vg.a]\ndevices=["/dev/sda"]', "(boolean)"),
        ('host = "H 1"\n[vg.a]\ndevices=["/dev/sda"]', "key 'host'"),
        ('[vg.a]\ndevices=["/dev/sda"]', "key 'host': expected a string; it is required"),
        ('host = "h1"', "no shared VG configured"),
        ('host = "h1"\n[vg.a]\n', "key 'vg.a.devices'"),
        ('host = "h1"\n[vg.a]\ndevices = "/dev/sda"', "key 'vg.a.devices'"),
        ('host = "h1"\n[vg.a]\ndevices = ["sda"]', "device paths under /dev/"),
        ('host = "h1"\n[vg.a]\ndevices = ["/dev/$(reboot)"]', "device paths under /dev/"),
        ('host = "h1"\n[vg.a]\ndevices = ["/dev/sda"]\nsize = 3', "unknown key 'vg.a.size'"),
        ('host = "h1"\n[vg.a]\ndevices = ["/dev/sda"]\n[vg.b]\ndevices = ["/dev/sda"]',
         "also in a"),
        ('host = "h1"\nstate_dir = "rel/path"\n[vg.a]\ndevices=["/dev/sda"]', "absolute path"),
        ('host = "h1"\nrun_dir = "run"\n[vg.a]\ndevices=["/dev/sda"]', "key 'run_dir'"),
        ('host = "h1"\nrun_dir = ""\n[vg.a]\ndevices=["/dev/sda"]', "key 'run_dir'"),
        ('host = "h1"\nactivation = "dm"\n[vg.a]\ndevices=["/dev/sda"]', "'lvm' or 'lab'"),
    ],
)
def test_bad_configs_are_refused_clearly(text, expect):
    with pytest.raises(ConfigError) as exc:
        config.parse(text, "/etc/fenceless/fenceless.toml")
    msg = str(exc.value)
    assert msg.startswith("Config /etc/fenceless/fenceless.toml: ")
    assert expect in msg
    assert exc.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        config.load(str(tmp_path / "nope.toml"))


def test_not_utf8(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"host = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(str(p))


def test_resolve_path_order():
    assert config.resolve_path("/a", {"FENCELESS_CONFIG": "/b"}) == "/a"
    assert config.resolve_path(None, {"FENCELESS_CONFIG": "/b"}) == "/b"
    assert config.resolve_path(None, {}) == config.DEFAULT_PATH


def test_live_migration_reaches_other_hosts_by_template():
    cfg = config.parse(GOOD, "/x.toml")
    assert cfg.peer("h2") == "qemu+ssh://h2/system" and cfg.migration_to("h2") is None
    lab = config.parse(GOOD + "", "/x.toml")._replace(
        peer_uri="qemu+unix:///system?socket=/lab/hosts/{host}/libvirt-sock",
        migration_uri="tcp://{host}.san")
    assert cfg.peer("h3").endswith("h3/system")
    assert lab.peer("h3") == "qemu+unix:///system?socket=/lab/hosts/h3/libvirt-sock"
    assert lab.migration_to("h3") == "tcp://h3.san"
    assert config.parse(config.render(lab), "/x.toml") == lab


def test_a_host_name_from_the_shared_disk_goes_into_no_uri_unchecked():
    cfg = config.parse(GOOD, "/x.toml")._replace(migration_uri="tcp://{host}")
    for bad in ("h2/system?no_verify=1#", "H2", "", "h2 x"):
        with pytest.raises(UsageError):
            cfg.peer(bad)
        with pytest.raises(UsageError):
            cfg.migration_to(bad)
