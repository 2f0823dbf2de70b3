"""docs/pytorch.md's complete example, run as it stands on the simulated device (no torch, no
GPU): it must print what the page says it prints."""

import os
import subprocess
import sys
import tempfile
import unittest

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "pytorch.md")
MARK = "<!-- example: pytorch-leaks -->\n```python\n"


def doc_blocks():
    """The example's code, and the output block that follows it in the page."""
    with open(DOC) as f:
        text = f.read()
    code, rest = text.split(MARK, 1)[1].split("```\n", 1)
    output = rest.split("```\n", 1)[1].split("```", 1)[0]
    return code, output


class DocsExampleTest(unittest.TestCase):
    def test_the_example_prints_what_the_page_says(self):
        code, expected = doc_blocks()
        env = dict(os.environ, HBMALLOC_CONF="backend:sim,leak_report:off")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "example.py"), "w") as f:
                f.write(code)
            out = subprocess.run([sys.executable, "example.py"], cwd=tmp, env=env,
                                 capture_output=True, text=True, timeout=120)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout, expected)
            with open(os.path.join(tmp, "leaks.txt")) as f:
                report = f.read()
            self.assertIn("py#1  handle_request at ", report)
            self.assertTrue(os.path.getsize(os.path.join(tmp, "snapshot.pickle")) > 0)


if __name__ == "__main__":
    unittest.main()
