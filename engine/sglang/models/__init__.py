"""SGLang's view of Shoal: the model package named by ``SGLANG_EXTERNAL_MODEL_PACKAGE``.

SGLang imports every module here in its own processes and registers each module's ``EntryClass`` under the class
name, which the shadow checkpoint's ``config.json`` names in ``architectures``. Nothing else in Shoal imports this
package: it needs ``sglang`` (and a GPU) to import.
"""
