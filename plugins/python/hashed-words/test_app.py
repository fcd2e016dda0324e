"""Native unit tests of `py-hashed-words` with the SDK's harness
(`cloister_plugin.testing`), no component involved:

    PYTHONPATH=plugin-sdk/python python3 -m unittest discover -s plugins/python/hashed-words

The harness takes the class through what the host does -- the metadata
check of `plugin add`, configuration with the declared defaults, the batch
call -- and refuses what the host would refuse. `cloister plugin build`
copies this file into the component too, where nothing imports it.
"""

import math
import unittest

from cloister_plugin import Record, term_key, testing

from app import HashedWords


class HashedWordsTests(unittest.TestCase):
    def test_words_land_in_their_buckets_with_unit_length(self):
        plugin = testing.configure(HashedWords, {"bits": "8"})
        (row,) = testing.featurize(plugin, [Record("r1", {"text": "Spam spam eggs"})])
        self.assertEqual([i for i, _ in row], sorted({term_key("spam") % 256, term_key("eggs") % 256}))
        self.assertAlmostEqual(math.fsum(v * v for _, v in row), 1.0, places=6)

    def test_a_record_without_the_field_is_invalid_input(self):
        plugin = testing.configure(HashedWords, {"field": "body"})
        with self.assertRaises(testing.Refused) as caught:
            testing.featurize(plugin, [Record("r1", {"text": "no body here"})])
        self.assertEqual(caught.exception.error.code, "invalid-input")

    def test_bits_out_of_range_name_the_key(self):
        with self.assertRaises(testing.Refused) as caught:
            testing.configure(HashedWords, {"bits": "25"})
        self.assertEqual((caught.exception.error.code, caught.exception.error.key), ("invalid-config", "bits"))


if __name__ == "__main__":
    unittest.main()
