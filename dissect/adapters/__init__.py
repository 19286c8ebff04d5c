"""Memory adapters for other libraries' layer types, one module per library, named for its top-level package.

``dissect.adapters.<package>`` registers (:func:`dissect.memory.register_adapter`) the layer types of
``<package>`` that :class:`~dissect.memory.LayerMemory` cannot read as a plain Linear or convolution. It is
imported the first time :func:`dissect.layers`, :func:`dissect.stats.collect` or a ``LayerMemory`` meets a
module whose class (or a base class) comes from ``<package>`` (:func:`dissect.hooks.import_adapters`), so
importing dissect never imports the library, and supporting a new library is one file here.
"""
