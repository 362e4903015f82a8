"""The application: the chapter's LeNet on Fashion-MNIST, built on tfbn's library.

Data (`data`), the model and recipe (`models`, `config`), training under a `tf.distribute`
strategy (`training`, `distribute`, `locks`), tuning (`tuning`), serving SavedModels (`serving`),
plots, the demo and the benchmarks. It needs the workflow extra: `pip install "tfbn[workflow]"`.
The library (`tfbn.layers`, `tfbn.ops`, `tfbn.tools`, `tfbn.utils`) never imports it.
"""
