from setuptools import find_packages, setup

setup(
    name="strategy-host",
    version="0.2.0",
    description="Strategy host for algorithmic trading on Shoonya (Finvasia, Noren OMS)",
    python_requires=">=3.10",
    packages=find_packages(include=["host", "host.*"]),
    include_package_data=True,
    package_data={"host.web": ["templates/*.html", "static/*"], "host": ["deploy_templates/*"]},
    py_modules=["wsgi"],
    install_requires=[
        "pluggy>=1.5,<2",
        "flask>=3.0,<4",
        "gunicorn>=27,<28",  # host/http_worker.py subclasses gthread's ThreadWorker
        "NorenRestApiOAuth==0.0.41",
        "websocket-client>=1.6,<2",
        "websockets>=13,<18",
        "requests>=2.31,<3",
        "python-dotenv>=1.0,<2",
        "sqlite-utils>=3.36,<5",
        "watchdog>=4,<8",
        "python-telegram-bot>=22,<23",
        "tzdata>=2024.1",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "pytest-xdist>=3.5,<4",
            "playwright>=1.45,<2",
            "hypothesis>=6.100,<7",
        ],
    },
    entry_points={"console_scripts": ["strategy-host=host.cli:main"]},
)
