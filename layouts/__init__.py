"""Weight-layout adapters and safe checkpoint readers/writers.

Not implemented in this release: the package exists so that the
distribution's layout is final. Its API is specified in DESIGN.md
(``to_torch``, ``from_torch``, ``load_checkpoint``, ``load_into``,
``save_safetensors``) and arrives with the layouts issue.
"""

__all__: list[str] = []
