"""JSON Schemas that constrained decoding must enforce: hand-written ones for each keyword, what
Pydantic's ``model_json_schema()`` makes of nested, optional, union, recursive and constrained
models, and what instructor and pydantic-ai send for a model. Shared by tests/test_constrained.py
(random walks over the engine) and tests/test_structured_outputs.py (through the gateway)."""

from __future__ import annotations

import datetime
import enum
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field


class Address(BaseModel):
    street: str = Field(max_length=20)
    city: str
    zip: str | None = None


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=12)
    age: int | None = None
    address: Address
    nicknames: list[str] = Field(default_factory=list, max_length=2)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Owner(BaseModel):
    pet: Cat | Dog = Field(discriminator="kind")


class Scalar(BaseModel):
    value: int | str | None


class Node(BaseModel):
    value: int
    children: list[Node] = Field(default_factory=list, max_length=2)


class Color(enum.StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Paint(BaseModel):
    color: Color
    finish: Literal["matte", "gloss"] = "matte"


class Constrained(BaseModel):
    code: Annotated[str, Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")]
    level: int = Field(ge=1, le=5)
    ratio: float = Field(ge=0, lt=1)
    tags: list[str] = Field(min_length=1, max_length=3)


class Counts(BaseModel):
    counts: dict[str, int] = Field(max_length=2)
    pair: tuple[int, str]


class Event(BaseModel):
    id: uuid.UUID
    day: datetime.date
    at: datetime.datetime


class Team(BaseModel):
    lead: Person | None = None
    size: int


class Step(BaseModel):
    explanation: str = Field(max_length=24)
    output: str = Field(max_length=12)


class MathReasoning(BaseModel):  # the OpenAI structured-outputs guide's example
    steps: list[Step] = Field(max_length=2)
    final_answer: str


def _instructor(model: type[BaseModel]) -> dict:
    """The tool parameters instructor sends for `model` (its TOOLS mode)."""
    from instructor import openai_schema

    return openai_schema(model).openai_schema["parameters"]


def _pydantic_ai(model: type[BaseModel]) -> dict:
    """The schema pydantic-ai sends for `model` to an OpenAI model (strict)."""
    from pydantic_ai.profiles.openai import OpenAIJsonSchemaTransformer

    return OpenAIJsonSchemaTransformer(model.model_json_schema(), strict=True).walk()


HAND_WRITTEN: dict[str, dict | None] = {
    "json_object": None,
    "any_value": {},
    "string_bounds": {"type": "string", "minLength": 2, "maxLength": 6},
    "enum_strings": {"enum": ["north", "south", "east", "west"]},
    "enum_mixed": {"enum": [1, "two", None, True]},
    "const": {"type": "object", "properties": {"v": {"const": "fixed"}}, "required": ["v"]},
    "integer_bounds": {"type": "integer", "minimum": -5, "maximum": 50},
    "number_exclusive": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "type_list": {"type": ["string", "null"]},
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        "maxItems": 2,
    },  # fmt: skip
    "object_closed": {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "string", "maxLength": 5},
            "c": {"type": "boolean"},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "additional_typed": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
    "any_of": {
        "anyOf": [
            {"type": "integer"},
            {"type": "object", "properties": {"x": {"type": "null"}}, "required": ["x"]},
        ]
    },  # fmt: skip
    "one_of": {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "number"}]},
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ]
    },  # fmt: skip
    "pattern": {"type": "string", "pattern": r"^[a-z]{2,4}[0-9]$"},
    "formats": {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "ip": {"type": "string", "format": "ipv4"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["email", "ip", "id"],
    },
    "unknown_format_ignored": {"type": "string", "format": "color-hex", "maxLength": 7},
    "definitions_ref": {
        "definitions": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            }
        },
        "type": "array",
        "items": {"$ref": "#/definitions/point"},
        "maxItems": 2,
    },  # fmt: skip
    "recursive_root": {
        "type": "object",
        "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["v", "next"],
    },
    "pattern_properties": {
        "type": "object",
        "patternProperties": {"^x_": {"type": "integer"}},
        "additionalProperties": False,
        "maxProperties": 2,
    },  # fmt: skip
}

PYDANTIC: dict[str, type[BaseModel]] = {
    "pydantic_nested_optional": Person,
    "pydantic_discriminated_union": Owner,
    "pydantic_plain_union": Scalar,
    "pydantic_recursive": Node,
    "pydantic_enum_literal": Paint,
    "pydantic_constrained": Constrained,
    "pydantic_dict_tuple": Counts,
    "pydantic_formats": Event,
    "pydantic_optional_model": Team,
    "pydantic_openai_guide": MathReasoning,
}


def corpus() -> dict[str, dict | None]:
    """Name -> schema (None: JSON mode, any object)."""
    schemas = dict(HAND_WRITTEN)
    for name, model in PYDANTIC.items():
        schemas[name] = model.model_json_schema()
    schemas["instructor_nested_optional"] = _instructor(Person)
    schemas["instructor_union"] = _instructor(Owner)
    schemas["pydantic_ai_nested_optional"] = _pydantic_ai(Person)
    schemas["pydantic_ai_recursive"] = _pydantic_ai(Node)
    return schemas
