# megaloc_ros on an official ROS 2 image.
#   CPU:  docker build -t megaloc_ros .
#   GPU:  docker build -t megaloc_ros:gpu --build-arg VARIANT=gpu .   (run with --gpus all)
#   Other distro: --build-arg ROS_DISTRO=jazzy
# Run:  docker run --rm -it --net=host -v $PWD/models:/models megaloc_ros \
#         ros2 launch megaloc_ros loop_closure.launch.py model_path:=/models/megaloc.onnx
ARG ROS_DISTRO=kilted
ARG VARIANT=cpu

FROM ros:${ROS_DISTRO}-ros-base AS base
ARG ROS_DISTRO
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update && apt-get install -y --no-install-recommends \
      python3-pip python3-numpy \
      ros-${ROS_DISTRO}-nav-msgs ros-${ROS_DISTRO}-visualization-msgs \
      ros-${ROS_DISTRO}-diagnostic-msgs ros-${ROS_DISTRO}-lifecycle-msgs \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 marks the system Python as externally managed (PEP 668).
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
# The runtime dependencies, the one list setup.py declares. numpy stays the distribution's 1.x:
# the ROS debs' message extensions are built against it and do not load under numpy 2.
COPY tools/requirements/runtime.txt /tmp/runtime.txt
RUN pip3 install -r /tmp/runtime.txt "numpy<2"

FROM base AS runtime-cpu
# OpenVINO runs the static-int8 IR (`megaloc-ros export --precision int8 --output FILE.xml`).
RUN pip3 install "numpy<2" openvino

# CUDA and cuDNN come as pip wheels with onnxruntime-gpu (it replaces the CPU onnxruntime: both
# install the same `onnxruntime` module); TensorRT for the fastest provider.
FROM base AS runtime-gpu
RUN pip3 uninstall -y onnxruntime && pip3 install "numpy<2" "onnxruntime-gpu[cuda,cudnn]" tensorrt-cu12
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime-${VARIANT} AS final
ARG ROS_DISTRO
WORKDIR /ws
COPY package.xml CMakeLists.txt setup.py README.md MANIFEST.in src/megaloc_ros/
COPY tools/requirements src/megaloc_ros/tools/requirements
COPY msg src/megaloc_ros/msg
COPY srv src/megaloc_ros/srv
COPY launch src/megaloc_ros/launch
COPY config src/megaloc_ros/config
COPY scripts src/megaloc_ros/scripts
COPY megaloc_ros src/megaloc_ros/megaloc_ros
RUN . /opt/ros/${ROS_DISTRO}/setup.bash \
    && colcon build --cmake-args -DBUILD_TESTING=OFF \
    && rm -rf build log
# The exported model (megaloc-ros export ...) is mounted at /models; the cache (TensorRT engines)
# lives there too, so it outlives the container.
ENV MEGALOC_MODEL=/models/megaloc.onnx MEGALOC_CACHE=/models/cache
RUN printf '#!/bin/bash\nset -e\n. /opt/ros/%s/setup.bash\n. /ws/install/setup.bash\nexec "$@"\n' "${ROS_DISTRO}" > /entrypoint.sh \
    && chmod +x /entrypoint.sh
ENTRYPOINT ["/entrypoint.sh"]
CMD ["ros2", "launch", "megaloc_ros", "loop_closure.launch.py"]
