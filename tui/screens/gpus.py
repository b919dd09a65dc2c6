from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from tui.widgets.gpus import GpuPanel


class LocalGpus(Screen):
    """This node's GPUs live from NVML, like nvitop; a plain line when NVML or the driver is missing."""

    BINDINGS = [Binding("escape", "app.pop_screen", "back")]

    def __init__(self, sampler_factory) -> None:
        super().__init__()
        self.sampler_factory = sampler_factory
        self.sampler = None
        self.problem = ""

    def compose(self) -> ComposeResult:
        yield Static("[b]this node's GPUs (NVML)[/b]", id="gpus-title")
        yield GpuPanel(id="local-gpus")
        yield Footer()

    def on_mount(self) -> None:
        from autotune.telemetry import NvmlUnavailable
        try:
            self.sampler = self.sampler_factory()
        except NvmlUnavailable as exc:
            self.problem = str(exc)
        self.tick()
        self.set_interval(1.0, self.tick)

    def tick(self) -> None:
        panel = self.query_one(GpuPanel)
        if self.sampler is None:
            panel.show([], self.problem)
        else:
            panel.show(self.sampler.sample())

    def on_unmount(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
