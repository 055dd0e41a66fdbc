"""Deterministic model output: text, JSON valid against a schema, and function calls."""

from __future__ import annotations

from typing import Any

from prefect_batch_llm.testing.emulator._state import stable_hash


def pick(mapping: dict[str, Any] | None, camel: str) -> Any:
    """`mapping[camel]`, or its snake_case spelling (the SDKs send both)."""
    if not mapping:
        return None
    if camel in mapping:
        return mapping[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return mapping.get(snake)


def texts(contents: list[dict[str, Any]] | dict[str, Any] | None) -> list[str]:
    """Every text part of a content or list of contents, in order."""
    if contents is None:
        return []
    items = [contents] if isinstance(contents, dict) else contents
    found: list[str] = []
    for content in items:
        for part in content.get("parts", []) or []:
            text = part.get("text")
            if isinstance(text, str):
                found.append(text)
            for key in ("functionCall", "function_call", "functionResponse", "function_response"):
                if key in part:
                    found.append(str(part[key]))
    return found


def last_user_text(contents: list[dict[str, Any]]) -> str:
    for content in reversed(contents):
        if content.get("role", "user") == "user":
            return "\n".join(texts(content))
    return ""


def default_answer(model: str, prompt: str) -> str:
    """The emulator's answer: a pure function of model and prompt."""
    digest = stable_hash(model, prompt)[:8]
    gist = " ".join(prompt.split()[:12])
    return f"[{model}#{digest}] Answer to: {gist}"


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1], {})
        return _resolve({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    return schema


def instance_for(schema: Any, seed: str, defs: dict[str, Any] | None = None) -> Any:
    """A deterministic value valid against a JSON schema (or Gemini's OpenAPI-style schema)."""
    if not isinstance(schema, dict):
        return seed[:8]
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    schema = _resolve(schema, defs)
    for key in ("anyOf", "any_of", "oneOf", "one_of", "allOf", "all_of"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if str(_resolve(o, defs).get("type")).lower() != "null"]
            return instance_for((non_null or options)[0], seed, defs)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        options = schema["enum"]
        return options[int(stable_hash(seed), 16) % len(options)]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "string")
    kind = str(kind or ("object" if "properties" in schema else "string")).lower()
    number = int(stable_hash(seed)[:8], 16)
    if kind == "object":
        properties = schema.get("properties", {}) or {}
        return {name: instance_for(sub, f"{seed}.{name}", defs) for name, sub in properties.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", schema.get("min_items", 1)) or 1), 1)
        limit = schema.get("maxItems", schema.get("max_items"))
        if limit is not None:
            count = min(count, int(limit))
        return [instance_for(schema.get("items", {}), f"{seed}[{i}]", defs) for i in range(count)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 100))
        return low + number % (high - low + 1)
    if kind == "number":
        floor = float(schema.get("minimum", 0.0))
        ceiling = float(schema.get("maximum", floor + 100.0))
        return round(floor + (number % 10_000) / 10_000 * (ceiling - floor), 3)
    if kind == "boolean":
        return number % 2 == 0
    if kind == "null":
        return None
    text = f"{seed.rsplit('.', 1)[-1]}-{stable_hash(seed)[:6]}"
    low_len = int(schema.get("minLength", 0))
    return text.ljust(low_len, "x")


def response_schema(generation_config: dict[str, Any] | None) -> Any:
    """The schema of a JSON-mode request, if any."""
    if not generation_config:
        return None
    for key in ("responseJsonSchema", "responseSchema"):
        schema = pick(generation_config, key)
        if schema is not None:
            return schema
    return None


def forced_function(body: dict[str, Any]) -> tuple[str, Any] | None:
    """(name, parameters schema) of the function the request forces the model to call.

    pydantic-ai's structured output declares `final_result` and sets mode ANY.
    """
    declarations: list[dict[str, Any]] = []
    for tool in body.get("tools") or []:
        declarations.extend(pick(tool, "functionDeclarations") or [])
    if not declarations:
        return None
    calling = pick(pick(body, "toolConfig") or {}, "functionCallingConfig") or {}
    mode = str(pick(calling, "mode") or "AUTO").upper()
    chosen = next((d for d in declarations if d.get("name") == "final_result"), None)
    if chosen is None and mode != "ANY":
        return None
    chosen = chosen or declarations[0]
    schema = (
        pick(chosen, "parametersJsonSchema")
        or chosen.get("parameters")
        or {"type": "object", "properties": {}}
    )
    return str(chosen.get("name")), schema
