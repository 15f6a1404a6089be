"""SGLang's view of Shoal: the model package named by ``SGLANG_EXTERNAL_MODEL_PACKAGE``.

SGLang imports every module here in its own processes and registers each module's ``EntryClass`` under the class
name, which the shadow checkpoint's ``config.json`` names in ``architectures``. Only
``engine.sglang.synthesizer.register_model_package`` imports it in Shoal: it needs ``sglang`` to import.

Its one module is imported here, eagerly: SGLang's ``import_model_classes`` skips a module that fails to import
with a warning nobody sees, but raises what the package's own import raises, so a broken model surfaces with its
cause in SGLang's processes instead of as "architecture not supported".
"""

from engine.sglang.models import shoal_s2pro as shoal_s2pro
