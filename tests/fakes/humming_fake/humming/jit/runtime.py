from .._fake import STATE
from .compiler import NVCCCompiler, NVRTCCompiler


class KernelRuntime:
    @staticmethod
    def _get_compiler():
        return NVCCCompiler if STATE.compiler == "NVCCCompiler" else NVRTCCompiler
