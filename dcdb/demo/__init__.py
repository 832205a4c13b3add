"""The demo world: everything `dcdb demo` and the tests need that is not dcdb itself.

``world`` draws a small DataComp-like world (images, captions, defects, evaluation tasks),
``teacher`` trains the tiny CLIP models that embed it, ``synth`` writes random but valid DataComp
metadata folders, ``toy`` writes tiny webdataset shards and tasks for training tests, ``run`` is
the `dcdb demo` loop. The core of dcdb (store, engine, query, vectors, shards, ingest) imports
nothing from here.
"""
