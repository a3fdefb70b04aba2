"""Planning works without torch or megatron installed."""

import subprocess
import sys


def test_schedules_package_imports_without_torch_or_megatron():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'megatron', 'numpy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import megatron_bitpipe.schedules as s\n"
        "from megatron_bitpipe.schedules import simulate, render\n"
        "for name in s.names():\n"
        "    s.get(name)\n"
        "print('ok', len(s.names()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
