"""What pyproject.toml cannot say declaratively: DESIGN.md fixes the repository's layout (core/ and
assets/ side by side at the top), and an installed wheel must carry the shipped default with it.
So assets/ is packaged as ``core.assets`` (installed as ``core/assets/``), where
``core.models.shipped.find_assets`` looks first; a checkout or an editable install reads
``assets/`` beside ``core/`` as always. Everything else lives in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["core", "core.*"]), "core.assets"],
      package_dir={"core.assets": "assets"},
      package_data={"core.assets": ["**/*"]},
      include_package_data=False)
