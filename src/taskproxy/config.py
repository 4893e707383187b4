"""Reading the settings: the YAML file and the environment, once, at the edge (the only reader of the
environment). Every problem becomes a `ConfigError` whose message is one line naming the key and what
is wrong with it (`models[0].base_url: field required`). The settings themselves are in settings.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from taskproxy.errors import ConfigError
from taskproxy.settings import DEFAULT_PROXY_URL, Settings

DEFAULT_CONFIG_PATH = Path("config/taskproxy.yaml")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    parts: list[str] = []
    for part in first["loc"]:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        else:
            parts.append(str(part))
    where = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" if where else message


def _env_name(where: str, value: Any) -> str:
    """The name of an environment variable a setting points to (it is read before the settings are checked)."""
    if not isinstance(value, str):
        raise ConfigError(f"config error: {where}: must be the name of an environment variable, not {type(value).__name__}")
    return value


def _with_secret(where: str, conf: Any, env: Mapping[str, str], required: bool) -> Any:
    if not isinstance(conf, dict):
        return conf
    if conf.get("token_env") and env.get(_env_name(f"{where}.token_env", conf["token_env"])):  # only `items sync` needs it: it says so when it is missing
        conf = {**conf, "token": env[conf["token_env"]]}
    if not conf.get("secret_env"):
        return conf
    name = _env_name(f"{where}.secret_env", conf["secret_env"])
    if not env.get(name):
        if not required:
            return conf
        raise ConfigError(f"config error: {where}.secret_env: environment variable {name} is not set")
    return {**conf, "secret": env[name]}


def _telemetry(conf: Any, env: Mapping[str, str]) -> Any:
    """The standard OpenTelemetry variables: an OTLP endpoint turns export on, OTEL_SDK_DISABLED off."""
    conf = dict(conf) if isinstance(conf, dict) else ({} if conf is None else conf)
    if not isinstance(conf, dict):
        return conf
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        conf["enabled"] = False
    elif "enabled" not in conf and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        conf["enabled"] = True
    if env.get("OTEL_SERVICE_NAME"):
        conf["service_name"] = env["OTEL_SERVICE_NAME"]
    return conf


def settings_from_mapping(data: Mapping[str, Any], env: Mapping[str, str], *, secrets_required: bool = True) -> Settings:
    """Validate `data` (the YAML document) and apply the environment's overrides and secrets. A secret
    whose variable is not set is an error, unless not `secrets_required` (the admin commands, which
    neither reach a provider nor take a webhook: a report run without the provider keys)."""
    data = dict(data)
    if env.get("TASKPROXY_DATABASE_URL"):
        data["database_url"] = env["TASKPROXY_DATABASE_URL"]
    if env.get("TASKPROXY_ADMIN_KEY"):
        data["admin_key"] = env["TASKPROXY_ADMIN_KEY"]
    models = data.get("models") or []
    if not isinstance(models, list):
        raise ConfigError("config error: models: must be a list")
    resolved = []
    for index, model in enumerate(models):
        if isinstance(model, dict) and model.get("api_key_env"):
            name = _env_name(f"models[{index}].api_key_env", model["api_key_env"])
            if env.get(name):
                model = {**model, "api_key": env[name]}
            elif secrets_required:
                raise ConfigError(f"config error: models[{index}].api_key_env: environment variable {name} is not set")
        resolved.append(model)
    data["models"] = resolved
    data["telemetry"] = _telemetry(data.get("telemetry"), env)
    trackers = data.get("trackers")
    if isinstance(trackers, dict):
        data["trackers"] = {name: _with_secret(f"trackers.{name}", conf, env, secrets_required) for name, conf in trackers.items()}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error: {_describe(exc)}") from None


def database_named(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a config file (`path`, $TASKPROXY_CONFIG or the default one) or $TASKPROXY_DATABASE_URL
    says which database to use; else `Settings`' default, a file in the current folder."""
    env = os.environ if env is None else env
    return bool(path or env.get("TASKPROXY_CONFIG") or env.get("TASKPROXY_DATABASE_URL") or DEFAULT_CONFIG_PATH.exists())


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, *, secrets_required: bool = True) -> Settings:
    """Read the config file (`path`, else $TASKPROXY_CONFIG, else config/taskproxy.yaml if present);
    `secrets_required` as `settings_from_mapping`'s."""
    env = os.environ if env is None else env
    explicit = path or env.get("TASKPROXY_CONFIG")
    config_path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    if not config_path.exists():
        if explicit:
            raise ConfigError(f"config error: {config_path}: no such file")
        return settings_from_mapping({}, env, secrets_required=secrets_required)
    try:
        document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config error: {config_path}: {first_line}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"config error: {config_path}: the top level must be a mapping of keys")
    return settings_from_mapping(document, env, secrets_required=secrets_required)


PROXY_KEY_PREFIX = "tp-"  # every key the proxy issues begins so (guard/auth.py)


def _proxy_key(value: str | None) -> str | None:
    return value if value and value.startswith(PROXY_KEY_PREFIX) else None


@dataclass(frozen=True)
class ClientSettings:
    """Where the developer commands (`taskproxy use`, `taskproxy me`) find the proxy, and the key they
    send: their flags, else $TASKPROXY_URL and $TASKPROXY_API_KEY (then $OPENAI_API_KEY, which a
    developer pointed at the proxy already holds, if it is a proxy key: a provider's own key is not
    sent to the proxy)."""

    url: str
    key: str | None

    @classmethod
    def load(cls, *, url: str | None, key: str | None, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        return cls(
            # The proxy's root: its own API is not under /v1, which an SDK's base URL habit adds.
            url=(url or env.get("TASKPROXY_URL") or DEFAULT_PROXY_URL).rstrip("/").removesuffix("/v1"),
            key=key or env.get("TASKPROXY_API_KEY") or _proxy_key(env.get("OPENAI_API_KEY")),
        )
