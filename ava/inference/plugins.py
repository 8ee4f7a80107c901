"""The plugin interface a serving layer builds on, and a registry that loads models lazily by name."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch

from ava.inference.errors import AvaInferenceError
from ava.inference.format import detect, read_tensors
from ava.inference.hardware import devices
from ava.inference.loader import LoadedModel, load_model


@dataclass(frozen=True)
class PluginMetadata:
    name: str
    parameters_total: int
    parameters_active: int
    dtype: str
    required_memory_bytes: int
    supported_devices: tuple[str, ...]


@runtime_checkable
class ModelPlugin(Protocol):
    @property
    def metadata(self) -> PluginMetadata: ...
    def load(self) -> None: ...
    def infer(self, text: Union[str, list[str]]) -> Union[str, list[str]]: ...
    def generate(self, prompts: Union[str, list[str]], **options: Any) -> Union[str, list[str]]: ...
    def health_check(self) -> bool: ...
    def cleanup(self) -> None: ...


class AvaModelPlugin:
    """An exported Ava model behind the plugin interface; `load()` happens on first use."""

    def __init__(self, name: str, path: Union[str, Path], **load_options: Any) -> None:
        self.name, self.path, self.load_options = name, Path(path), load_options
        self._loaded: Optional[LoadedModel] = None
        self._lock = threading.Lock()
        self._metadata: Optional[PluginMetadata] = None

    @property
    def metadata(self) -> PluginMetadata:
        """Computed from the export itself (no weights loaded onto a device)."""
        if self._metadata is None:
            export = detect(self.path)
            tensors = read_tensors(export, verify=False)
            from ava.model import AvaForCausalLM

            with torch.device("meta"):
                model = AvaForCausalLM(export.config)
            dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
            self._metadata = PluginMetadata(
                name=self.name, parameters_total=model.num_parameters(),
                parameters_active=model.num_parameters(active_only=True), dtype=str(dtype).removeprefix("torch."),
                required_memory_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                supported_devices=tuple(d.name for d in devices() if dtype in d.dtypes),
            )
        return self._metadata

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def load(self) -> None:
        with self._lock:
            if self._loaded is None:
                self._loaded = load_model(self.path, **self.load_options)

    def _model(self) -> LoadedModel:
        self.load()
        assert self._loaded is not None
        return self._loaded

    def infer(self, text: Union[str, list[str]]) -> Union[str, list[str]]:
        return self._model().generate(text)

    def generate(self, prompts: Union[str, list[str]], **options: Any) -> Union[str, list[str]]:
        return self._model().generate(prompts, **options)

    def health_check(self) -> bool:
        return self._loaded is not None and self._loaded.health_check()

    def cleanup(self) -> None:
        """Drop every reference to the model and free device memory; safe to call twice."""
        with self._lock:
            self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ModelRegistry:
    """Several models by name, each loaded on first use and unloaded on request."""

    def __init__(self) -> None:
        self._plugins: dict[str, ModelPlugin] = {}

    def register(self, plugin: ModelPlugin, name: Optional[str] = None) -> None:
        key = name or plugin.metadata.name
        if key in self._plugins:
            raise AvaInferenceError(f"a model named {key!r} is already registered")
        self._plugins[key] = plugin

    def add(self, name: str, path: Union[str, Path], **load_options: Any) -> AvaModelPlugin:
        plugin = AvaModelPlugin(name, path, **load_options)
        self.register(plugin, name)
        return plugin

    def get(self, name: str) -> ModelPlugin:
        if name not in self._plugins:
            raise AvaInferenceError(f"no model named {name!r}; registered: {sorted(self._plugins)}")
        plugin = self._plugins[name]
        plugin.load()
        return plugin

    def unload(self, name: str) -> None:
        self._plugins[name].cleanup() if name in self._plugins else None

    def names(self) -> list[str]:
        return sorted(self._plugins)
