"""What RetroTemplate and KnnVerbalizer share as wrappers of an OpenPrompt template / verbalizer."""


class PassThroughToBase:
    """Mixin for wrappers (RetroTemplate, KnnVerbalizer): attributes they lack come from ``self.base``,
    the wrapped OpenPrompt template or verbalizer (``soft_embeds``, ``group_parameters_1``, ...)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (nn.Module)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)
