class NVRTCCompiler:
    pass


class NVCCCompiler:
    pass
