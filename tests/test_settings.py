"""Configuration: the example file documents every setting, and bad input fails with one clear line."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from conftest import BOTH_DATABASES
from pydantic import BaseModel

from taskproxy.errors import ConfigError
from taskproxy.config import load_settings, settings_from_mapping
from taskproxy.settings import Settings, WorkItemSettings

EXAMPLE = Path(__file__).parent.parent / "config" / "taskproxy.example.yaml"


def _models_in(annotation: object) -> list[tuple[type[BaseModel], str]]:
    """The settings models inside a field's type, with how their keys are reached ("." or ".*.")."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, ".")]
    if typing.get_origin(annotation) is dict:  # dict[str, Model]: the keys are names the user chooses
        return [(model, ".*.") for model, _ in _models_in(typing.get_args(annotation)[1])]
    return [pair for arg in typing.get_args(annotation) for pair in _models_in(arg)]


def _documented_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if field.exclude:  # secrets filled from the environment, never written in the file
            continue
        keys.add(prefix + name)
        for nested, step in _models_in(field.annotation):
            keys |= _documented_keys(nested, prefix + name + step)
    return keys


def _keys_in(text: str) -> set[str]:
    """Every key path mentioned in the example, commented-out ones included."""
    uncommented = re.sub(r"(?m)^(\s+)# (\s*[a-z_]+:.*)$", r"\1\2", text)  # indented, commented-out keys
    document = yaml.safe_load(uncommented)
    found: set[str] = set()

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                found.add(prefix + key)
                walk(child, prefix + key + ".")
        elif isinstance(value, list):
            for child in value:
                walk(child, prefix)

    walk(document, "")
    # A name the user chooses (a team under budgets.teams) stands for any name: also record it as "*".
    for path in list(found):
        parts = path.split(".")
        for index in range(1, len(parts) - 1):
            found.add(".".join([*parts[:index], "*", *parts[index + 1 :]]))
    return found


def test_example_config_documents_every_setting() -> None:
    missing = _documented_keys(Settings) - _keys_in(EXAMPLE.read_text())
    assert not missing, f"settings missing from {EXAMPLE.name}: {sorted(missing)}"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(EXAMPLE, env={"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant"})
    assert settings.models[0].api_key.get_secret_value() == "sk-x"
    assert settings.work_items.mode == "open" and settings.limits.max_body_bytes == 32 * 1024 * 1024


def test_copying_the_example_accepts_the_same_work_item_ids_as_no_config() -> None:
    """A user who starts from the example must not lose an id form (GitLab's `group/project!7`) the default accepts."""
    example = load_settings(EXAMPLE, env={"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant"}).work_items
    assert example.patterns == WorkItemSettings().patterns
    assert example.branch_patterns == WorkItemSettings().branch_patterns


def test_environment_overrides_database_and_admin_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("database_url: sqlite:///file.db\n")
    settings = load_settings(path, env={"TASKPROXY_DATABASE_URL": "sqlite:///other.db", "TASKPROXY_ADMIN_KEY": "tp-admin"})
    assert settings.database_url == "sqlite:///other.db"
    assert settings.admin_key.get_secret_value() == "tp-admin"
    assert "tp-admin" not in repr(settings)  # secrets never printed


@pytest.mark.parametrize("url", ["sqlite:///x.db", "sqlite+pysqlite:///x.db", "postgresql://u@h/db", "postgresql+psycopg://u@h/db", "postgres://u@h/db"])
def test_every_database_url_sqlalchemy_reads_as_sqlite_or_postgresql_is_taken(url: str) -> None:
    assert settings_from_mapping({"database_url": url}, {}).database_url == url


def test_taskproxy_config_variable_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("work_items: {mode: known}\n")
    assert load_settings(env={"TASKPROXY_CONFIG": str(path)}).work_items.mode == "known"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"models": [{"name": "a"}]}, "config error: models[0].base_url: Field required"),
        ({"modles": []}, "config error: modles: unknown key"),
        ({"models": [{"name": "a", "base_url": "ftp://x"}]}, "config error: models[0].base_url: must be an http:// or https:// URL"),
        ({"work_items": {"mode": "strict"}}, "config error: work_items.mode: Input should be 'open', 'known' or 'active'"),
        ({"models": [{"name": "a", "base_url": "http://x", "api_key_env": "NOT_SET_ANYWHERE"}]},
         "config error: models[0].api_key_env: environment variable NOT_SET_ANYWHERE is not set"),
        ({"limits": {"max_body_bytes": -1}}, "config error: limits.max_body_bytes: Input should be greater than 0"),
        ({"models": [{"name": "a", "base_url": "http://x"}, {"name": "a", "base_url": "http://y"}]}, "models[1].name: 'a' is configured twice"),
        ({"reports": {"size_bands": {"lines": [200, 50]}}}, "reports.size_bands.lines: the bounds must be non-negative and strictly increasing"),
        ({"reports": {"size_bands": {"points": [-1]}}}, "reports.size_bands.points: the bounds must be"),
        ({"reports": {"work_mem_mb": 3_000_000}}, "reports.work_mem_mb: Input should be less than or equal to 2097151"),
        ({"reports": {"statement_timeout_seconds": 2_592_000}}, "reports.statement_timeout_seconds: Input should be less than or equal to 2147483"),
        ({"work_items": {"teams": {"PAY": "payments", " pay": "growth"}}}, "work_items.teams: the project 'pay' is named twice"),
        ({"work_items": {"teams": {"PAY": " "}}}, "work_items.teams: each project and its team must be named"),
        ({"trackers": {"github": {"api_url": "http://github.example.com"}}}, "trackers.github.api_url: must be an https:// URL"),
        # Each of these was a traceback (or, the last two, a 500 on requests or deliveries later).
        ({"trackers": {"github": {"secret_env": ["GH"]}}}, "trackers.github.secret_env: must be the name of an environment variable, not list"),
        ({"trackers": {"jira": {"token_env": {"a": 1}}}}, "trackers.jira.token_env: must be the name of an environment variable, not dict"),
        ({"models": [{"name": "a", "base_url": "http://x", "api_key_env": 5}]}, "models[0].api_key_env: must be the name of an environment variable"),
        ({"database_url": "nosuch://x"}, "config error: database_url: taskproxy runs on SQLite"),
        ({"database_url": "postgresql+psycopg2://u@h/db"}, "config error: database_url: taskproxy runs on SQLite"),  # a driver not installed
        ({"work_items": {"binding_ttl_hours": 1e12}}, "work_items.binding_ttl_hours: Input should be less than or equal to 876000"),
        ({"work_items": {"cache_size": 10**30}}, "work_items.cache_size: Input should be less than or equal to 10000000"),
        ({"reports": {"rework_days": 1e12}}, "reports.rework_days: Input should be less than or equal to 36500"),
        ({"reports": {"stale_after_days": 1e6}}, "reports.stale_after_days: Input should be less than or equal to 36500"),
        ({"budgets": {"work_item_usd": float("inf")}}, "budgets.work_item_usd: Input should be less than or equal to 1000000000"),
        ({"trackers": {"landing_branches": [" develop "]}}, "trackers.landing_branches: ' develop ' is not a branch pattern"),
        ({"trackers": {"landing_branches": [""]}}, "trackers.landing_branches: '' is not a branch pattern"),
    ],
)  # fmt: skip
def test_bad_config_fails_with_one_line_naming_the_key(document: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping(document, {})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.yaml", env={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_settings(broken, env={})


@pytest.mark.parametrize("fallbacks", [["missing"], ["a"]])
def test_fallbacks_must_name_another_configured_model(fallbacks: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.fallbacks"):
        settings_from_mapping({"models": [{"name": "a", "base_url": "http://x", "fallbacks": fallbacks}]}, {})


def test_a_database_without_a_schema_revision_is_refused_with_what_to_do(tmp_path: Path) -> None:
    import sqlite3

    from taskproxy.cli import main
    from taskproxy.errors import SchemaBehind
    from taskproxy.storage.db import make_engine, prepare_schema

    database = tmp_path / "old.db"
    prepare_schema(make_engine(f"sqlite:///{database}"))
    with sqlite3.connect(database) as old:  # as a build from before migrations left it
        old.execute("DROP TABLE alembic_version")
    with pytest.raises(SchemaBehind, match=r"no schema revision.*new database"):
        prepare_schema(make_engine(f"sqlite:///{database}"))
    config = tmp_path / "c.yaml"
    config.write_text(f"database_url: sqlite:///{database}\n")
    assert main(["db", "upgrade", "--config", str(config)]) == 2  # refused the same way, changing nothing
    with sqlite3.connect(database) as still:
        assert still.execute("SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'").fetchone()[0] == 0


def _not_a_partition(obj: object, name: str | None, kind: str, reflected: bool, compare_to: object) -> bool:
    """usage_events' monthly partitions (storage/partitions.py) are made at run time, not by a model."""
    return not (kind == "table" and reflected and name is not None and re.fullmatch(r"usage_events_(p\d{6}|default)", name))


@BOTH_DATABASES
def test_the_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from taskproxy.storage.db import make_engine, upgrade_schema
    from taskproxy.storage.models import metadata

    engine = make_engine(database_url)
    upgrade_schema(engine)
    options = {"compare_server_default": True, "include_object": _not_a_partition}
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts=options), metadata)
    engine.dispose()
    assert differences == [], "models changed without a migration: add one under storage/migrations/versions"
    from taskproxy.storage import models

    elsewhere = [name for name, value in vars(models).items() if isinstance(value, models.Rows) and value.__table__.metadata is not metadata]
    assert elsewhere == [], f"tables on another MetaData escape this comparison: {elsewhere}"


def test_the_revisions_read_without_alembic_are_alembics(tmp_path: Path) -> None:
    """Start-up reads the head and the database's revision without importing alembic (10 MiB)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from taskproxy.storage.db import _alembic, current_revision, head_revision, make_engine, upgrade_schema

    assert head_revision() == ScriptDirectory.from_config(_alembic(None)).get_current_head()
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with engine.connect() as connection:
        assert current_revision(connection) is None == MigrationContext.configure(connection).get_current_revision()
    upgrade_schema(engine)
    with engine.connect() as connection:
        assert current_revision(connection) == MigrationContext.configure(connection).get_current_revision() == head_revision()


def test_one_landing_branch_may_be_given_alone() -> None:
    assert settings_from_mapping({"trackers": {"landing_branches": "develop"}}, {}).trackers.landing_branches == ("develop",)
